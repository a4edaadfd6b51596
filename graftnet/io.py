"""Crash-safe file writes: write to a temporary file in the same folder, fsync, then rename.

A killed process or a full disk leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

STARTED = time.time()  # temporary files older than this process are no one's in this process


def cache_root(configured: str | Path | None = None) -> Path:
    """graftnet's cache (features, datasets, fetched weights): the configured folder, else
    $GRAFTNET_CACHE, else ~/.cache/graftnet."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("GRAFTNET_CACHE", Path.home() / ".cache" / "graftnet"))


@contextlib.contextmanager
def terminate_as_exit():
    """Within the block, SIGTERM (`kill`, a scheduler's time limit) raises SystemExit instead of
    ending Python at once, so `finally` blocks and `except BaseException` remove temporary files on
    the way out. Only the main thread may set a handler; one the program set itself is left alone."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)  # the exit status a shell reports for a terminated command
    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# atomic_write's and temp_dir's names: ".<target>.<8 random characters of mkstemp>.tmp"
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove what killed writers (SIGKILL, power loss: nothing in Python runs) left in `folder`:
    only names of atomic_write's pattern, only older than this process. Returns what went."""
    gone = []
    for p in folder.iterdir() if folder.is_dir() else []:
        try:
            if TEMP_NAME.fullmatch(p.name) and p.lstat().st_mtime < STARTED:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                gone.append(p)
        except OSError:  # another process removed it first, or it is not ours to remove
            pass
    return gone


def temp_dir(beside: Path):
    """A temporary folder beside `beside`, named like its atomic_write temp files: removed on the
    way out (SIGTERM included), and by remove_stale_temps if the process is killed outright."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{beside.name}.", suffix=".tmp", dir=beside.parent)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with terminate_as_exit():
        return _atomic_write(path, write)


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make 0600; results are shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
