"""Evaluate and predict with a finished run, and write a run's closing metrics, plots and report."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import RunConfig, resolve, to_dict
from .data.images import ImageSet, config_splits, decode, load_images, square_uint8
from .data.pixels import list_images
from .data.sources import open_source
from .errors import DataError, GraftError
from .io import atomic_write_json
from .metrics import classification_metrics, confusion_table, metrics_table
from .model import ModelSpec, load_model
from .progress import console, log
from .report.html import write_report
from .report.plots import plot_confusion, plot_curves, plot_samples
from .run import read_history
from .train.features import compute_features


def finish_evaluation(run_dir: Path, cfg: RunConfig, spec: ModelSpec, history: list[dict],
                      logits: torch.Tensor, labels: torch.Tensor, test: ImageSet,
                      train: ImageSet | None, prefix: str = "") -> dict:
    """Metrics tables in the terminal; JSON, plots and report.html in the run folder."""
    m = classification_metrics(logits, labels, spec.classes)
    atomic_write_json(run_dir / f"{prefix}test_metrics.json", m)
    console.print(metrics_table(m, spec.classes))
    console.print(confusion_table(m, spec.classes))
    images = {}
    if history:
        plot_curves(history, run_dir / "curves.png")
        images["Training curves"] = run_dir / "curves.png"
    plot_confusion(m["confusion"], spec.classes, run_dir / f"{prefix}confusion.png")
    images["Confusion matrix (test)"] = run_dir / f"{prefix}confusion.png"
    if len(test):
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(test), generator=g)[:32].tolist()
        preds = logits.argmax(1)
        plot_samples([test.images[i] for i in pick],
                     [f"{spec.classes[preds[i]]}\n(true: {spec.classes[labels[i]]})" for i in pick],
                     run_dir / f"{prefix}predictions.png",
                     colors=["green" if preds[i] == labels[i] else "red" for i in pick])
        images["Test predictions (green: right, red: wrong)"] = run_dir / f"{prefix}predictions.png"
    if train is not None and len(train):
        g = torch.Generator().manual_seed(1)
        pick = torch.randperm(len(train), generator=g)[:32].tolist()
        plot_samples([train.images[i] for i in pick], [spec.classes[train.labels[i]] for i in pick],
                     run_dir / "samples.png")
        images["Training samples"] = run_dir / "samples.png"
    env_path = run_dir / "environment.json"
    summary = {"test accuracy": f"{m['accuracy']:.4f}", **{k: f"{v:.4f}" for k, v in m["top_k"].items()
                                                           if k != "top1"},
               "test images": m["n"], "backbone": spec.backbone, "input": f"{spec.image_size}px",
               "features": f"{spec.features} ({spec.feature_dim})", "epochs": len(history)}
    write_report(run_dir / f"{prefix}report.html", f"graftnet run {run_dir.name}", summary, to_dict(cfg),
                 history, m, images, spec.classes,
                 json.loads(env_path.read_text()) if env_path.is_file() else None)
    log(f"test accuracy {m['accuracy']:.4f}; report: {run_dir / (prefix + 'report.html')}")
    return m


@torch.no_grad()
def image_logits(model, spec: ModelSpec, cfg: RunConfig, images: ImageSet, batch_size: int,
                 description: str) -> torch.Tensor:
    """Logits the way the run was evaluated: the image, and its mirror averaged in with flip_views."""
    views = [False, True] if cfg.train.flip_views else [False]
    logits = [model.mlp(compute_features(model, images, spec.image_size, spec.mean, spec.std,
                                         batch_size, cfg.backbone.precision, cfg.backbone.channels_last,
                                         flip=flip, description=description).float())
              for flip in views]
    return sum(logits) / len(logits)


def evaluate_run(run_dir: str | Path, data: str | None = None, batch_size: int = 256) -> dict:
    """Evaluate a finished run on a data set's test split (or on all of it if it has no split)."""
    run_dir = Path(run_dir)
    model, spec = load_model(run_dir)
    cfg = resolve(run_dir / "config.yaml")
    data = data or cfg.data.path
    source = open_source(data, cfg.cache_dir)
    if source.classes != spec.classes:
        missing = sorted(set(spec.classes) - set(source.classes))
        extra = sorted(set(source.classes) - set(spec.classes))
        raise DataError(f"{data}: classes do not match the model's (missing: {missing or 'none'}; "
                        f"unknown to the model: {extra or 'none'})")
    if data == cfg.data.path or Path(data).resolve() == Path(cfg.data.path).resolve():
        # the run's own data: exactly the test split it was scored on
        samples = config_splits(source, cfg.data)["test"]
    elif "test" in source.splits or "val" in source.splits:
        samples = source.splits.get("test") or source.splits["val"]
    else:
        samples = source.splits["all"]
    images = load_images(source, samples, spec.image_size, cfg.data.skip_bad, cfg.data.workers)
    logits = image_logits(model, spec, cfg, images, batch_size, "evaluate")
    out = run_dir / "evaluations" / Path(data).stem
    out.mkdir(parents=True, exist_ok=True)
    for f in ("config.yaml", "environment.json"):
        if (run_dir / f).is_file():
            (out / f).write_bytes((run_dir / f).read_bytes())
    return finish_evaluation(out, cfg, spec, read_history(run_dir), logits, images.labels, images, None)


@torch.no_grad()
def predict(run_dir: str | Path, target: str | Path, top: int = 3, batch_size: int = 64) -> list[dict]:
    model, spec = load_model(run_dir)
    cfg = resolve(Path(run_dir) / "config.yaml")
    paths = list_images(target)
    tensors = []
    for p in paths:
        try:
            tensors.append(square_uint8(decode(p.read_bytes(), str(p)), spec.image_size))
        except OSError as e:
            raise GraftError(f"{p}: cannot read ({e})") from None
    images = ImageSet(tensors, torch.zeros(len(tensors), dtype=torch.long), [str(p) for p in paths],
                      spec.classes)
    probs = image_logits(model, spec, cfg, images, batch_size, "predict").softmax(1)
    results = []
    for path, p in zip(paths, probs):
        values, idx = p.topk(min(top, len(spec.classes)))
        results.append({"file": str(path), "class": spec.classes[idx[0]],
                        "probability": round(values[0].item(), 6),
                        "top": [{"class": spec.classes[i], "probability": round(v.item(), 6)}
                                for v, i in zip(values, idx)]})
    return results
