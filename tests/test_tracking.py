"""Experiment tracking: what a run sends to TensorBoard and to a real MLflow tracking server, read
back with their own readers; a killed and resumed run leaves one record, not two."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from graftnet.config import resolve
from graftnet.errors import ConfigError
from graftnet.train.loop import Callback
from graftnet.train.pipeline import train
from tests.conftest import tiny_overrides

mlflow = pytest.importorskip("mlflow")


class KillAfter(Callback):
    """Ctrl-C at the end of epoch `epoch`, before that epoch's checkpoint: resume redoes it."""
    key = "KillAfter"

    def __init__(self, epoch: int):
        self.epoch = epoch

    def after_epoch(self, state, row) -> None:
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_epoch_once_across_a_resume_and_the_test_scores(image_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = resolve(None, tiny_overrides(image_folder, tmp_path, name="tb", **{"track.log_to": "tensorboard"}))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[KillAfter(2)])
    run = train(None, resume=tmp_path / "runs" / "tb")
    acc = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    rows = history(run.run_dir)
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [r["epoch"] for r in rows] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("val/acc")] == pytest.approx([r["val_acc"] for r in rows], rel=1e-6)
    assert acc.Scalars("test/accuracy")[0].value == pytest.approx(run.metrics["accuracy"], rel=1e-6)
    assert {"confusion", "curves"} <= set(acc.Tags()["images"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback, with its own store and artifact folder."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(20)


def test_mlflow_server_gets_params_epochs_test_metrics_and_the_model(image_folder, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    cfg = resolve(None, tiny_overrides(image_folder, tmp_path, name="ml", **{
        "track.log_to": "mlflow", "track.mlflow_uri": mlflow_server, "track.experiment": "leaves"}))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[KillAfter(2)])
    saved = json.loads((tmp_path / "runs" / "ml" / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(saved["run_id"]).info.status == "RUNNING"  # FAILED at this process's exit
    run = train(None, resume=tmp_path / "runs" / "ml")

    exp = client.get_experiment_by_name("leaves")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]  # the resume went on in the same run
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "ml"
    assert r.data.params["train.lr"] == str(cfg.train.lr) and r.data.params["backbone.name"] == cfg.backbone.name
    val = client.get_metric_history(r.info.run_id, "val_acc")
    by_step = {m.step: m.value for m in val}
    assert sorted(by_step) == [1, 2, 3]
    assert [by_step[s] for s in (1, 2, 3)] == pytest.approx([row["val_acc"] for row in history(run.run_dir)])
    assert r.data.metrics["test_accuracy"] == pytest.approx(run.metrics["accuracy"])
    files = {a.path for a in client.list_artifacts(r.info.run_id)} | \
        {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert {"model/model.safetensors", "model/model.json", "MODEL_CARD.md", "report.html", "confusion.png"} <= files
    local = Path(client.download_artifacts(r.info.run_id, "model/model.safetensors", str(tmp_path / "dl")))
    assert local.read_bytes() == (run.run_dir / "model.safetensors").read_bytes()


def test_the_embedded_store_and_an_unreachable_server(image_folder, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    run = train(resolve(None, tiny_overrides(image_folder, tmp_path, name="local", **{
        "track.log_to": "mlflow", "train.epochs": 1})))
    db = tmp_path / "runs" / "mlflow.db"  # beside the run folders, artifacts beside it
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (r,) = client.search_runs([client.get_experiment_by_name("graftnet").experiment_id])
    assert r.data.metrics["test_accuracy"] == pytest.approx(run.metrics["accuracy"])
    assert (tmp_path / "runs" / "mlartifacts").is_dir()

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = resolve(None, tiny_overrides(image_folder, tmp_path, name="nowhere", **{
        "track.log_to": "mlflow", "track.mlflow_uri": dead}))
    t0 = time.time()
    with pytest.raises(ConfigError, match=f"--log-to mlflow: cannot log to {dead}"):
        train(cfg)
    assert time.time() - t0 < 60 and not (tmp_path / "runs" / "nowhere").exists()
    with pytest.raises(ConfigError, match="track.log_to: wandb is not one of tensorboard, mlflow"):
        resolve(None, {"track.log_to": "tensorboard,wandb"})
    shutil.rmtree(tmp_path / "runs")
