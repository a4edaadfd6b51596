"""Progress bars (Rich) and a run log that goes both to the terminal and to the run folder."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from .train.distributed import is_main

console = Console(stderr=True, highlight=False)
_log_file: Path | None = None


def set_log_file(path: Path | None) -> None:
    global _log_file
    _log_file = path


def log(message: str) -> None:
    if not is_main():  # under torchrun, rank 0 speaks for all
        return
    console.print(message)
    if _log_file is not None:
        with open(_log_file, "a") as f:
            f.write(time.strftime("%H:%M:%S ") + Console().render_str(message).plain + "\n")


@contextlib.contextmanager
def bar(total: int, description: str):
    """Yields advance(n=1, **fields). Quiet when GRAFTNET_QUIET=1 (tests) or stderr is no terminal."""
    if os.environ.get("GRAFTNET_QUIET") or not sys.stderr.isatty() or not is_main():
        yield lambda n=1, **kw: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            info = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            progress.update(task, advance=n, info=info)
        yield advance
