"""Run folders: one per training run, holding everything that produced and describes the result.

    runs/<name>/config.yaml        resolved config (`graft train --config` reproduces the run)
    runs/<name>/environment.json   versions, machine, seed, command line
    runs/<name>/metrics.jsonl      one row per epoch
    runs/<name>/checkpoint/        the last checkpoint (epoch end or within an epoch), for --resume
    runs/<name>/model.safetensors  final weights; model.json rebuilds the architecture
    runs/<name>/test_metrics.json, *.png, report.html

One lifecycle for every command that makes a run folder (train, finetune, distill, prune, QAT,
ensemble): `create_run` makes the folder with its config and environment, `run_scope` logs into it
and, if the command fails before the folder holds anything worth keeping, removes it.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import check_folder_name, save_yaml
from .errors import ConfigError
from .io import atomic_write_json, atomic_write_text


@dataclass(eq=False)
class RunResult(os.PathLike):
    """What a finished run gives back: its folder, its test metrics (test_metrics.json) and its best
    validation score, so a caller (a search's trial) needs no file parsing. It stands for the folder
    wherever a path is expected (`os.fspath`, `result / "report.html"`, `Path(result)`)."""
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list, repr=False)

    @property
    def best_val(self) -> float | None:
        """The best validation accuracy of any epoch (None without a validation split)."""
        accs = [r["val_acc"] for r in self.history if r.get("val_acc") == r.get("val_acc")]  # drop NaN
        return max(accs) if accs else None

    def __fspath__(self) -> str:
        return os.fspath(self.run_dir)

    def __truediv__(self, other) -> Path:
        return self.run_dir / other

    def __str__(self) -> str:
        return str(self.run_dir)

    def __eq__(self, other) -> bool:  # the same run as a folder path or another result
        return isinstance(other, (RunResult, str, os.PathLike)) and Path(self.run_dir) == Path(other)

    def __hash__(self) -> int:
        return hash(Path(self.run_dir))


def new_run_dir(out: str, name: str | None, backbone: str) -> Path:
    base = Path(out)
    check_folder_name(name)
    if base.exists() and not base.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder for run folders")
    if name is None:
        name = f"{backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = base / name
    suffix = 1
    while path.exists() and any(path.iterdir()):
        path = base / f"{name}-{suffix}"
        suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int) -> dict:
    return {
        "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "graftnet_commit": _git_commit(),
        "packages": {p: _version(p) for p in ("graftnet", "torch", "torchvision", "timm", "numpy",
                                               "pillow", "safetensors", "matplotlib")},
    }


def write_environment(run_dir: Path, seed: int) -> None:
    atomic_write_json(run_dir / "environment.json", environment(seed))


def write_history(run_dir: Path, history: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def create_run(out: str | Path, name: str | None, prefix: str, cfg=None, seed: int = 0,
               header: str = "") -> Path:
    """A new run folder (`name`, or <prefix>-<timestamp>; a suffix where the name is taken) holding
    the resolved `cfg` as config.yaml (with `header` as comment lines) and environment.json."""
    run_dir = new_run_dir(str(out), name, prefix)
    try:
        if cfg is not None:
            save_yaml(cfg, run_dir / "config.yaml", header=header)
        write_environment(run_dir, seed)
    except BaseException:  # a full disk, a bug, Ctrl-C: the folder holds nothing a run could use
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


KEEP = ("checkpoint/last.safetensors", "model.safetensors")  # either one: the run can go on or be used


@contextlib.contextmanager
def run_scope(run_dir: Path | None, keep_if: str | tuple[str, ...] = KEEP, remove: bool = True):
    """Log into run_dir/log.txt while the block runs (None: this process writes no log, e.g. a
    worker under torchrun). If the block fails in any way (a graftnet error, a bug, Ctrl-C) before
    one of `keep_if` exists, the folder holds nothing worth keeping and is removed (`remove`: a
    folder this command made), so a failed command leaves no half-made run behind."""
    from .progress import log_to
    keep = (keep_if,) if isinstance(keep_if, str) else keep_if
    try:
        with log_to(run_dir / "log.txt" if run_dir is not None else None):
            yield run_dir
    except BaseException:
        if remove and run_dir is not None and not any((run_dir / k).exists() for k in keep):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
