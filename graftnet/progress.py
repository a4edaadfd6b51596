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


def _info(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@contextlib.contextmanager
def bar(total: int, description: str, done: int = 0):
    """Yields advance(n=1, **fields). A Rich bar on a terminal. When stderr is a file or a pipe
    (nohup, a batch job, CI) a bar would print nothing until it ends, and an epoch can take a quarter
    of an hour; so a plain line goes out every GRAFTNET_PROGRESS_SECONDS (default 60) instead.
    Quiet when GRAFTNET_QUIET=1 (tests) and on ranks other than 0. `done`: steps already done
    (a resumed epoch), counted in the bar but not in the rate behind the ETA."""
    if os.environ.get("GRAFTNET_QUIET") or not is_main():
        yield lambda n=1, **kw: None
        return
    if not sys.stderr.isatty():
        every = float(os.environ.get("GRAFTNET_PROGRESS_SECONDS", "60"))
        start = last = time.monotonic()
        first = done

        def advance(n: int = 1, **fields):
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last < every or done >= total:  # the finished step gets its own line anyway
                return
            last = now
            rate = (done - first) / max(now - start, 1e-9)
            info = "  " + _info(fields) if fields else ""
            print(f"{description}: {done}/{total} ({100 * done / total:.0f}%){info}  elapsed "
                  f"{_clock(now - start)}  ETA {_clock((total - done) / rate)}", file=sys.stderr, flush=True)
        yield advance
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=done, info="")

        def advance(n: int = 1, **fields):
            progress.update(task, advance=n, info=_info(fields))
        yield advance
