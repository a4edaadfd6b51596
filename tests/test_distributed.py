"""DDP under torchrun: 2 CPU processes (gloo) train like 1 with the same global batch (also when
each splits its slice into chunks), only rank 0 writes, and a run killed on 2 processes within an
epoch resumes on 1."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from graftnet.cli import main
from graftnet.model import load_model

from .conftest import ROOT, TINY
from .test_train import _position


def _args(data, tmp_path, name):
    # Dropout off and BatchNorm in eval mode: the 2-process run is then the same function of the
    # same global batches as the 1-process run, up to float summation order.
    return ["finetune", "--data", str(data), "--backbone", TINY, "--no-pretrained", "--image-size", "32",
            "--epochs", "2", "--finetune-epochs", "3", "--unfreeze", "gradual:1", "--bn", "eval",
            "--batch-size", "4", "--hidden", "16", "--dropout", "0", "--features", "multi",
            "--lr", "3e-3", "--finetune-lr", "2e-3", "--out", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "--name", name]


def _torchrun(args):
    env = {**os.environ, "GRAFTNET_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "graftnet.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it, as a crash of the machine would: torchrun starts
    each worker in a session of its own, so killing torchrun's process group leaves them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in reversed(tree):  # the workers before torchrun, which would notice their end
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _assert_same(a_dir, b_dir, atol):
    a, _ = load_model(a_dir)
    b, _ = load_model(b_dir)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=atol), (k, (va.float() - vb.float()).abs().max())


def test_two_processes_match_one_and_resume_on_one(image_folder, tmp_path):
    runs = tmp_path / "runs"
    assert main(_args(image_folder, tmp_path, "one")) == 0

    # each process's slice of 2 images in chunks of 1, gradients accumulated, all-reduced once
    two = _torchrun(_args(image_folder, tmp_path, "two") + ["--micro-batch", "1"])
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    _assert_same(runs / "one", runs / "two", atol=2e-4)
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]  # rank 1 made no folder of its own
    assert (runs / "two" / "report.html").is_file()
    # the history's training numbers cover both processes' slices, like the 1-process run's
    history = [[json.loads(x) for x in (runs / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    for a, b in zip(*history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["train_acc"] - b["train_acc"]) < 1e-6

    # killed on 2 processes within a fine-tuning epoch (checkpoints after every batch), resumed on
    # 1: ends where the 1-process run ended, the interrupted epoch's numbers over all its batches
    killed = runs / "killed"
    proc = _torchrun(_args(image_folder, tmp_path, "killed") + ["--checkpoint-minutes", "1e-9"])
    deadline = time.time() + 300
    while _position(killed) < (3, 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    _kill_tree(proc.pid)
    proc.wait()
    epoch, batch = _position(killed)
    time.sleep(0.5)
    assert _position(killed) == (epoch, batch), "a worker outlived the kill and went on writing"
    assert epoch == 3 and batch > 0, f"the 2-process run was not killed within epoch 4: {epoch}, {batch}"
    assert main(["finetune", "--resume", str(killed)]) == 0
    _assert_same(runs / "one", killed, atol=2e-4)
    resumed = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(history[0], resumed):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["train_acc"] - b["train_acc"]) < 1e-6


def test_shard_partitions_each_global_batch(monkeypatch):
    from graftnet.train import distributed
    x, y = torch.arange(20).view(10, 2), torch.arange(10)
    seen = []
    for r in range(3):
        monkeypatch.setattr(distributed, "world", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        (xs, ys), (xt, yt) = list(distributed.shard([(x, y), (x[:2], y[:2])]))
        assert torch.equal(xs[:, 0] // 2, ys)
        seen += ys.tolist()
        assert torch.equal(yt, y[:2])  # smaller than the world: whole, to every rank
    assert sorted(seen) == list(range(10))
