"""DDP under torchrun: 2 CPU processes (gloo) train like 1 with the same global batch, only rank 0
writes, and a run killed on 2 processes resumes on 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from graftnet.cli import main
from graftnet.model import load_model

from .conftest import ROOT, TINY
from .test_train import kill_after_epoch


def _args(data, tmp_path, name):
    # Dropout off and BatchNorm in eval mode: the 2-process run is then the same function of the
    # same global batches as the 1-process run, up to float summation order.
    return ["finetune", "--data", str(data), "--backbone", TINY, "--no-pretrained", "--image-size", "32",
            "--epochs", "2", "--finetune-epochs", "3", "--unfreeze", "gradual:1", "--bn", "eval",
            "--batch-size", "8", "--hidden", "16", "--dropout", "0", "--features", "multi",
            "--lr", "3e-3", "--finetune-lr", "2e-3", "--out", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "--name", name]


def _torchrun(args):
    env = {**os.environ, "GRAFTNET_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "graftnet.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _assert_same(a_dir, b_dir, atol):
    a, _ = load_model(a_dir)
    b, _ = load_model(b_dir)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=atol), (k, (va.float() - vb.float()).abs().max())


def test_two_processes_match_one_and_resume_on_one(image_folder, tmp_path):
    runs = tmp_path / "runs"
    assert main(_args(image_folder, tmp_path, "one")) == 0

    two = _torchrun(_args(image_folder, tmp_path, "two"))
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    _assert_same(runs / "one", runs / "two", atol=2e-4)
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]  # rank 1 made no folder of its own
    assert (runs / "two" / "report.html").is_file()
    # the history's training numbers cover both processes' slices, like the 1-process run's
    history = [[json.loads(x) for x in (runs / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")]
    for a, b in zip(*history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["train_acc"] - b["train_acc"]) < 1e-6

    # killed on 2 processes during fine-tuning, resumed on 1: ends where the 1-process run ended
    killed = runs / "killed"
    done = kill_after_epoch(_torchrun(_args(image_folder, tmp_path, "killed")), killed, 3, group=True)
    assert 3 <= done < 5, "the 2-process run was not killed during fine-tuning"
    assert main(["finetune", "--resume", str(killed)]) == 0
    _assert_same(runs / "one", killed, atol=2e-4)


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
