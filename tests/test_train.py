"""Training mechanics: learning happens, the feature cache is reused and equivalent, runs resume,
NaN stops cleanly, and the run folder holds everything that produced the result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from graftnet import config
from graftnet.errors import TrainingDiverged
from graftnet.model import load_model
from graftnet.train.loop import Callback
from graftnet.train.pipeline import train

from .conftest import ROOT, tiny_overrides


def test_head_learns_and_run_folder_is_complete(image_folder, tmp_path):
    cfg = config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"train.epochs": 8}))
    run = train(cfg)
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "model.safetensors", "model.json",
                 "test_metrics.json", "test_predictions.csv", "test_logits.safetensors", "curves.png", "confusion.png", "predictions.png", "samples.png",
                 "report.html", "log.txt", "checkpoint/last.safetensors"):
        assert (run / name).is_file(), name
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["accuracy"] > 0.6  # 3 classes: chance is 0.33
    env = json.loads((run / "environment.json").read_text())
    assert env["seed"] == 0 and env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["packages"]["timm"] and env["command"]
    # the saved config reproduces the run exactly
    again = train(config.resolve(run / "config.yaml", {"name": "again"}))
    assert json.loads((again / "test_metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    # the saved model rebuilds without the training code's state
    model, spec = load_model(run)
    assert spec.classes == ["cat", "dog", "fox"]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # curves, confusion, predictions, samples inline
    lo, hi = metrics["accuracy_ci95"]
    assert lo < metrics["accuracy"] <= hi and f"{lo:.4f}–{hi:.4f}" in html  # the interval's card


def test_feature_cache_is_reused_by_another_head(image_folder, tmp_path):
    run1 = train(config.resolve(None, tiny_overrides(image_folder, tmp_path)))
    cached = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(cached) == 3  # train, val, test
    stamps = [p.stat().st_mtime_ns for p in cached]
    run2 = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"head.hidden": [64, 16]})))
    assert "from cache" in (run2 / "log.txt").read_text()
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert "computed" in (run1 / "log.txt").read_text()
    # another input size is another cache entry
    train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"backbone.image_size": 40})))
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 6


def test_cached_path_matches_backbone_every_batch(image_folder, tmp_path):
    """Training on cached features is the same computation as running the frozen backbone on every
    batch: same seed, same batches, same head -> the same weights (within float noise)."""
    a = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, name="cached",
                                                  **{"backbone.precision": "fp32"})))
    b = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, name="naive",
                                                  **{"backbone.precision": "fp32",
                                                     "train.cache_features": False})))
    ma, _ = load_model(a)
    mb, _ = load_model(b)
    for (k, va), vb in zip(ma.mlp.state_dict().items(), mb.mlp.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-4), k


class _NanAt(Callback):
    def __init__(self, step):
        self.at = step

    def after_loss(self, state, loss):
        return loss * float("nan") if state.step + 1 == self.at else loss


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(image_folder, tmp_path):
    cfg = config.resolve(None, tiny_overrides(image_folder, tmp_path, name="nan"))
    steps_per_epoch = -(-int(42 * 0.8 * 0.9) // 8)  # images in train split / batch size, rounded up
    with pytest.raises(TrainingDiverged, match=r"at step \d+ \(epoch 2\)") as err:
        train(cfg, callbacks=[_NanAt(steps_per_epoch + 2)])
    assert err.value.step == steps_per_epoch + 2
    ckpt = tmp_path / "runs" / "nan" / "checkpoint" / "last.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        meta = json.loads(f.metadata()["graftnet"])
        assert meta["epoch"] == 1
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if k.startswith("model/"))


def _graft(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "graftnet.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _position(run: Path) -> tuple[int, int]:
    """(epochs done, batches of the next done) of run's checkpoint; (0, 0) before the first."""
    try:
        with safe_open(str(run / "checkpoint" / "last.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["graftnet"])
        return meta["epoch"], meta.get("batch", 0)
    except Exception:  # not written yet
        return 0, 0


def kill_after_epoch(proc, run: Path, epoch: int) -> int:
    """SIGKILL `proc` once `run` has checkpointed `epoch`; returns the epoch the run had completed
    when it died."""
    deadline = time.time() + 300
    while _position(run)[0] < epoch and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _position(run)[0]


def test_sigkill_then_resume_ends_where_an_uninterrupted_run_ends(image_folder, tmp_path):
    """A run killed (SIGKILL) mid-training resumes from its last completed epoch with the same
    optimizer and RNG state, and finishes with the same weights as a run that was never stopped."""
    args = ["train", "--data", str(image_folder), "--backbone", "test_efficientnet", "--no-pretrained",
            "--image-size", "48", "--epochs", "6", "--batch-size", "4", "--hidden", "32",
            "--dropout", "0.3", "--no-cache", "--out", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32"]
    env = {**os.environ, "GRAFTNET_QUIET": "1"}
    ref = _graft(*args, "--name", "ref", env=env)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    killed = tmp_path / "runs" / "killed"
    done = kill_after_epoch(_graft(*args, "--name", "killed", env=env), killed, 2)
    assert 2 <= done < 6, "the run was not killed mid-training"
    assert not (killed / "model.safetensors").exists()
    resumed = _graft("train", "--resume", str(killed), env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    history = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    a, _ = load_model(tmp_path / "runs" / "ref")
    b, _ = load_model(killed)
    for (k, va), vb in zip(a.mlp.state_dict().items(), b.mlp.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5), k


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from graftnet.cli import main
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a graftnet run folder" in capsys.readouterr().err
