"""Progress bars (Rich) and a run log that goes both to the terminal and to the run folder."""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from .ranks import is_main

def make_console(stderr: bool = False, **kwargs) -> Console:
    """A Rich console for results (stdout) or progress and logs (stderr). On a terminal it wraps at
    the terminal's width; into a file or a pipe Rich would assume 80 columns, split table rows and
    cut class names to "airp…", so there nothing wraps (unless COLUMNS is set: it still rules)."""
    stream = sys.stderr if stderr else sys.stdout
    unwrapped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=100_000 if unwrapped else None, **kwargs)


console = make_console(stderr=True, highlight=False)
# The log file of the run being worked on, per context (a thread, an asyncio task) rather than per
# process: two runs in one process (a search's trials in threads) each log into their own folder.
_log_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("graftnet_log_file", default=None)


@contextlib.contextmanager
def log_to(path: Path | None):
    """Log into `path` (besides the terminal) while the block runs, then to what was before."""
    token = _log_file.set(path)
    try:
        yield
    finally:
        _log_file.reset(token)


def log(message: str) -> None:
    if not is_main():  # under torchrun, rank 0 speaks for all
        return
    console.print(message)
    path = _log_file.get()
    if path is not None:
        with open(path, "a") as f:
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
