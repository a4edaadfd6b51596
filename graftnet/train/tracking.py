"""Experiment tracking as callbacks on the training lifecycle: `--log-to tensorboard` writes event
files into the run folder, `--log-to mlflow` logs to an MLflow tracking store (a team's server with
`--mlflow-uri`, else a SQLite store beside the run folders). Both get the run's settings, each
epoch's metrics, the test metrics, the plots and the card; MLflow also the model files.

A resumed run goes on logging into the same MLflow run (its id is kept in the run folder) and the
same TensorBoard folder, where epochs logged after the last checkpoint are dropped (`purge_step`),
so a kill and `--resume` leave one clean curve. Only rank 0 logs.
"""
from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

from ..config import TrackConfig, to_dict
from ..errors import ConfigError
from ..io import atomic_write_json
from ..progress import log
from .checkpoint import checkpoint_epoch
from .distributed import is_main
from .loop import Callback, State

MLFLOW_RUN_FILE = "mlflow_run.json"
# files of a finished run that a tracking store should hold, besides the plots
RUN_FILES = ("config.yaml", "model.json", "model.safetensors", "test_metrics.json", "report.html",
             "MODEL_CARD.md", "metrics.jsonl")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def scalars(d: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, by dotted name: what a tracker can plot."""
    return {k: float(v) for k, v in flatten(d, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}


def final_scalars(metrics: dict) -> dict[str, float]:
    picked = {"accuracy": metrics.get("accuracy"), "loss": metrics.get("loss"), **metrics.get("top_k", {}),
              **{f"macro_{k}": v for k, v in (metrics.get("macro") or {}).items()},
              # multi-label runs
              "map": metrics.get("map"), "micro_f1": (metrics.get("micro") or {}).get("f1")}
    b = metrics.get("binary") or {}
    picked.update({"roc_auc": b.get("auc"), **{f"threshold_{k}": v for k, v in (b.get("threshold") or {}).items()
                                                if k in ("sensitivity", "specificity", "value")}})
    return scalars({k: v for k, v in picked.items() if v is not None}, "test_")


class TensorBoardLogger(Callback):
    """Event files in RUN/tensorboard: `tensorboard --logdir runs` shows every run's curves."""
    key = "TensorBoardLogger"

    def __init__(self):
        self.writer = None

    def before_run(self, job, resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        purge = checkpoint_epoch(job.run_dir) + 1 if resume else None
        self.writer = SummaryWriter(log_dir=str(job.run_dir / "tensorboard"), purge_step=purge)
        self.params = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                       for k, v in flatten(to_dict(job.cfg)).items() if v is not None}
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in self.params.items()), 0)

    def after_epoch(self, state: State, row: dict) -> None:
        for k, v in scalars({k: v for k, v in row.items() if k != "epoch"}).items():
            self.writer.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k, v, row["epoch"])
        self.writer.flush()

    def after_run(self, job, metrics: dict) -> None:
        import numpy as np
        from PIL import Image
        test = final_scalars(metrics)
        for k, v in test.items():
            self.writer.add_scalar(k.replace("_", "/", 1), v, 0)
        # the hyperparameters view: this run's settings beside its test scores
        self.writer.add_hparams(self.params, test, run_name=".")
        for png in sorted(job.run_dir.glob("*.png")):
            with Image.open(png) as img:
                self.writer.add_image(png.stem, np.asarray(img.convert("RGB")), 0, dataformats="HWC")
        card = job.run_dir / "MODEL_CARD.md"
        if card.is_file():
            self.writer.add_text("model card", card.read_text(), 0)
        self.writer.close()


class MLflowLogger(Callback):
    """One MLflow run per graftnet run, through MlflowClient (no global active run, so a search's
    trials in one process do not share one). A run that ends in an error or a kill is marked
    FAILED at exit; `--resume` reopens it."""
    key = "MLflowLogger"

    def __init__(self, track: TrackConfig):
        self.track, self.client, self.run_id, self.finished = track, None, None, False

    def uri(self, job) -> str:
        return self.track.mlflow_uri or f"sqlite:///{(Path(job.cfg.out) / 'mlflow.db').resolve()}"

    def before_run(self, job, resume: bool) -> None:
        # fail in seconds, not after MLflow's default minutes of retries, when the server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        uri, saved = self.uri(job), job.run_dir / MLFLOW_RUN_FILE
        try:
            self.client = MlflowClient(tracking_uri=uri)
            known = json.loads(saved.read_text()) if resume and saved.is_file() else {}
            if known.get("tracking_uri") == uri:
                self.run_id = known["run_id"]
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            else:
                exp = self.client.get_experiment_by_name(self.track.experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(
                    self.track.experiment, artifact_location=self._artifacts(job, uri))
                run = self.client.create_run(exp_id, run_name=job.run_dir.name, tags={
                    "graftnet.run_dir": str(job.run_dir.resolve()), "graftnet.backbone": job.spec.backbone,
                    "graftnet.data": str(job.cfg.data.path), "mlflow.source.name": "graft"})
                self.run_id = run.info.run_id
                params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                          for k, v in flatten(to_dict(job.cfg)).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    self.client.log_batch(self.run_id, params=params[i:i + 100])
                atomic_write_json(saved, {"tracking_uri": uri, "run_id": self.run_id})
        except (MlflowException, OSError) as e:
            raise ConfigError(f"--log-to mlflow: cannot log to {uri} ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
        atexit.register(self._end, "FAILED")
        log(f"mlflow: run {self.run_id} at {uri}")

    def _artifacts(self, job, uri: str) -> str | None:
        """The local store keeps artifacts beside its database; a server decides its own."""
        if uri.startswith("sqlite:///"):
            return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return None

    def after_epoch(self, state: State, row: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row["epoch"]) for k, v in scalars(row).items() if k != "epoch"]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # noqa: BLE001 - a tracking hiccup must not end hours of training
            log(f"[yellow]mlflow: epoch {row['epoch']} not logged ({type(e).__name__}); training goes on[/]")

    def after_run(self, job, metrics: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in final_scalars(metrics).items()])
        for f in [*(job.run_dir / n for n in RUN_FILES), *sorted(job.run_dir.glob("*.png"))]:
            if f.is_file():
                self.client.log_artifact(self.run_id, str(f), "model" if f.suffix in (".safetensors", ".json")
                                         and f.stem.startswith("model") else None)
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self.finished or self.client is None:
            return
        self.finished = True
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - at exit, the store may be gone; nothing to tell anyone
            pass


def trackers(track: TrackConfig) -> list[Callback]:
    """The loggers `track.log_to` names (rank 0 only: one record per run, not per process)."""
    import importlib.util
    for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if name in track.loggers and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--log-to {name}: the {module} package is not installed "
                              "(pip install 'graftnet[tracking]')")
    if not is_main():
        return []
    made = {"tensorboard": TensorBoardLogger, "mlflow": lambda: MLflowLogger(track)}
    return [made[name]() for name in track.loggers]
