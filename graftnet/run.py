"""Run folders: one per training run, holding everything that produced and describes the result.

    runs/<name>/config.yaml        resolved config (`graft train --config` reproduces the run)
    runs/<name>/environment.json   versions, machine, seed, command line
    runs/<name>/metrics.jsonl      one row per epoch
    runs/<name>/checkpoint/        the last checkpoint (epoch end or within an epoch), for --resume
    runs/<name>/model.safetensors  final weights; model.json rebuilds the architecture
    runs/<name>/test_metrics.json, *.png, report.html
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
from pathlib import Path

import torch

from .io import atomic_write_json, atomic_write_text


def new_run_dir(out: str, name: str | None, backbone: str) -> Path:
    base = Path(out)
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


@contextlib.contextmanager
def run_scope(run_dir: Path, keep_if: str = "model.safetensors"):
    """Log into run_dir/log.txt while the block runs. If it fails before `keep_if` exists, the folder
    holds nothing worth keeping and is removed, so a failed command leaves no half-made run behind."""
    from .progress import set_log_file
    set_log_file(run_dir / "log.txt")
    try:
        yield run_dir
    except BaseException:
        set_log_file(None)
        if not (run_dir / keep_if).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        set_log_file(None)
