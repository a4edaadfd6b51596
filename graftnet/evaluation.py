"""Evaluate and predict with a finished run, and write a run's closing metrics, plots and report."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import torch

from .config import RunConfig, resolve, to_dict
from .data.decoded import decode_split
from .data.images import ImageSet, config_splits
from .data.labels import open_data
from .data.pixels import list_images, predict_files
from .errors import DataError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, save_tensors
from .binary import BINARY_HEADER, binary_metrics, binary_rows, binary_table, positive_index
from .metrics import classification_metrics, confusion_table, metrics_table
from .multilabel import labels_above
from .model import ModelSpec
from .predictor import RunPredictor, flip_tta, load_predictor
from .progress import bar, console, log
from .report.card import write_card
from .report.html import write_report
from .report.multilabel import finish_multilabel
from .report.plots import plot_confusion, plot_curves, plot_predictions, plot_roc, plot_samples
from .run import read_history, write_environment


def finish_evaluation(run_dir: Path, cfg: RunConfig, spec: ModelSpec, history: list[dict],
                      logits: torch.Tensor, labels: torch.Tensor, test: ImageSet,
                      train: ImageSet | None, prefix: str = "",
                      val: tuple[torch.Tensor, torch.Tensor] | None = None,
                      threshold: float | None = None, cards: dict | None = None,
                      title: str | None = None) -> dict:
    """Metrics tables in the terminal; JSON, plots and report.html in the run folder. Two-class
    runs add sensitivity, specificity, ROC-AUC and a ROC curve, and metrics at a decision threshold
    chosen on the validation logits `val` (or the given `threshold`). `cards`: more label -> value
    boxes at the top of the report (what pruning, distillation or QAT started from). `title`:
    the report's heading (default: "graftnet run <folder name>"). Multi-label runs: per-label
    metrics at the thresholds in `spec` (report/multilabel.py)."""
    if spec.multilabel:
        return finish_multilabel(run_dir, to_dict(cfg), spec, history, logits, labels, test.keys, train, prefix,
                                 len(val[1]) if val is not None else None, cards, title)
    m = classification_metrics(logits, labels, spec.classes)
    if len(spec.classes) == 2:
        m["binary"] = binary_metrics(logits, labels, spec.classes, cfg.eval, val, threshold)
    # images per split, so a model card or a later reader need not open the data again
    m["split_sizes"] = {"train": len(train) if train is not None else None,
                        "val": len(val[1]) if val is not None else None, "test": len(labels)}
    atomic_write_json(run_dir / f"{prefix}test_metrics.json", m)
    if len(test.keys) == len(logits):
        write_predictions(run_dir, prefix, logits, labels, test.keys, spec.classes)
    console.print(metrics_table(m, spec.classes))
    console.print(confusion_table(m, spec.classes))
    images, tables, extra = {}, [], {}
    if "binary" in m:
        b = m["binary"]
        console.print(binary_table(b))
        points = {"argmax": (1 - b["argmax"]["specificity"], b["argmax"]["sensitivity"])}
        if "threshold" in b:
            t = b["threshold"]
            points[f"threshold {t['value']:.3f}"] = (1 - t["specificity"], t["sensitivity"])
            extra = {"sensitivity @ threshold": f"{t['sensitivity']:.4f}",
                     "specificity @ threshold": f"{t['specificity']:.4f}"}
        val_roc = (b["val_roc"]["fpr"], b["val_roc"]["tpr"]) if "val_roc" in b else None
        plot_roc(b["roc"]["fpr"], b["roc"]["tpr"], b["auc"], run_dir / f"{prefix}roc.png", points,
                 val_roc, b["positive_class"])
        images["ROC curve (test)"] = run_dir / f"{prefix}roc.png"
        note = f"positive class {b['positive_class']}, test ROC-AUC " + \
            (f"{b['auc']:.4f}" if b["auc"] is not None else "undefined (one class only)")
        if "threshold" in b:
            note += f"; threshold chosen on: {b['threshold']['chosen_on']}"
        tables.append(("Two-class metrics (test)", note, BINARY_HEADER, binary_rows(b)))
        extra = {"ROC-AUC": f"{b['auc']:.4f}" if b["auc"] is not None else "—", **extra}
    if history:
        plot_curves(history, run_dir / "curves.png")
        images["Training curves"] = run_dir / "curves.png"
    plot_confusion(m["confusion"], spec.classes, run_dir / f"{prefix}confusion.png")
    images["Confusion matrix (test)"] = run_dir / f"{prefix}confusion.png"
    if len(test) and len(test) == len(logits) and (labels >= 0).any():
        plot_predictions(test.images, logits, labels, spec.classes, run_dir / f"{prefix}predictions.png")
        images["Test predictions: the highest-loss mistakes first (✗ wrong: predicted and true class "
               "with their probabilities), then the surest right answers (✓ right)"] = \
            run_dir / f"{prefix}predictions.png"
    if train is not None and len(train):
        g = torch.Generator().manual_seed(1)
        pick = torch.randperm(len(train), generator=g)[:32].tolist()
        plot_samples([train.images[i] for i in pick], [spec.classes[train.labels[i]] for i in pick],
                     run_dir / "samples.png")
        images["Training samples"] = run_dir / "samples.png"
    env_path = run_dir / "environment.json"
    lo, hi = m["accuracy_ci95"]
    summary = {"test accuracy": f"{m['accuracy']:.4f}", "95% interval (Wilson)": f"{lo:.4f}–{hi:.4f}",
               **{k: f"{v:.4f}" for k, v in m["top_k"].items() if k != "top1"},
               "test images": m["n"], "backbone": spec.backbone, "input": f"{spec.image_size}px",
               # an ensemble has members, not features or epochs of its own
               **({"members": spec.feature_dim} if spec.timm_name == "ensemble" else
                  {"features": f"{spec.features} ({spec.feature_dim})", "epochs": len(history)}),
               **({"started from": cfg.train.init} if cfg.train.init else {}), **extra,
               **(cards or {})}
    write_report(run_dir / f"{prefix}report.html", title or f"graftnet run {run_dir.name}", summary, to_dict(cfg),
                 history, m, images, spec.classes,
                 json.loads(env_path.read_text()) if env_path.is_file() else None, tables)
    if not prefix:  # a model handed on carries its card (an evaluation elsewhere makes no new model)
        write_card(run_dir)
    log(f"test accuracy {m['accuracy']:.4f}; report: {run_dir / (prefix + 'report.html')}")
    return m


def write_predictions(run_dir: Path, prefix: str, logits: torch.Tensor, labels: torch.Tensor,
                      keys: list[str], classes: list[str]) -> None:
    """Per-image results, so every number in test_metrics.json can be checked and mistakes found:
    test_predictions.csv (file, true and predicted class, their probabilities; sorted as the test
    split is) and test_logits.safetensors (the raw logits and labels in the same order, for
    calibration or for combining runs without scoring the images again)."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    probs = logits.softmax(1)
    conf, preds = probs.max(1)
    p_true = probs.gather(1, labels.clamp(min=0).view(-1, 1)).squeeze(1)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "true", "predicted", "correct", "p_predicted", "p_true"])
    for key, y, p, c, t in zip(keys, labels.tolist(), preds.tolist(), conf.tolist(), p_true.tolist()):
        known = 0 <= y < len(classes)  # unlabeled images (label -1) have no true class
        writer.writerow([key, classes[y] if known else "", classes[p], int(p == y), f"{c:.6f}",
                         f"{t:.6f}" if known else ""])
    atomic_write_text(run_dir / f"{prefix}test_predictions.csv", out.getvalue())
    save_tensors(run_dir / f"{prefix}test_logits.safetensors", {"logits": logits, "labels": labels},
                 {"classes": json.dumps(classes), "rows": "as in test_predictions.csv"})


def validation_logits(model, spec: ModelSpec, cfg: RunConfig,
                      val: ImageSet) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two-class and multi-label runs: the validation split's logits, from which the decision
    threshold(s) are chosen. The current model runs on the images (one pass over the validation split),
    so the logits are right whatever training changed, the backbone included; None otherwise."""
    if (len(spec.classes) != 2 and not spec.multilabel) or not len(val):
        return None
    predictor = RunPredictor(Path(cfg.name or "run"), model, spec, cfg)
    return predictor.logits(val, cfg.train.eval_batch_size, "validation"), val.labels


def run_threshold(run_dir: Path) -> float | None:
    """The decision threshold a two-class run chose on its validation split, if it has one."""
    try:
        return json.loads((Path(run_dir) / "test_metrics.json").read_text())["binary"]["threshold"]["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate_run(run_dir: str | Path, data: str | None = None, batch_size: int = 256,
                 tta: bool = False, skip_bad: bool = False, labels: str | None = None) -> dict:
    """Evaluate a finished run or ensemble on a data set's test split (or on all of it if it has no
    split). `tta`: also score each image's mirror and average (results go to a folder of their
    own, `evaluations/<data>-tta`, so they never overwrite the plain evaluation). A two-class
    run keeps the threshold it chose on plain validation scores. `skip_bad` (or the run's own
    data.skip_bad): unreadable images are left out and named in the log, not a failure. `labels`:
    a label file for the images under `data` (default: the run's own, when `data` is its folder)."""
    run_dir = Path(run_dir)
    predictor = load_predictor(run_dir)
    if tta:
        flip_tta(predictor)
    spec, cfg = predictor.spec, resolve(run_dir / "config.yaml")
    data = data or cfg.data.path
    own_folder = data == cfg.data.path or Path(data).resolve() == Path(cfg.data.path).resolve()
    labels = labels or (cfg.data.labels if own_folder else None)
    source = open_data(dataclasses.replace(cfg.data, path=data, labels=labels), cfg.cache_dir)
    if source.multilabel and not spec.multilabel:
        raise DataError(f"{labels}: has images with several labels (or none); {run_dir} is a single-label "
                        "model, which gives each image one class")
    if sorted(source.classes) != sorted(spec.classes):
        missing = sorted(set(spec.classes) - set(source.classes))
        extra = sorted(set(source.classes) - set(spec.classes))
        raise DataError(f"{data}: classes do not match the model's (missing: {missing or 'none'}; "
                        f"unknown to the model: {extra or 'none'})")
    if own_folder and labels == cfg.data.labels:
        # the run's own data: exactly the test split it was scored on
        samples = config_splits(source, cfg.data)["test"]
    elif "test" in source.splits or "val" in source.splits:
        samples = source.splits.get("test") or source.splits["val"]
    else:
        samples = source.splits["all"]
    with bar(len(samples), "decoding images") as advance:
        images = decode_split(source, samples, predictor.image_size, cfg.data, cfg.cache_dir, advance,
                              skip_bad=skip_bad or cfg.data.skip_bad)
    for reason in images.skipped:
        log(f"[yellow]skipped[/] {reason}")
    if not len(images):
        raise DataError(f"{data}: none of its {len(samples)} images could be read")
    if spec.multilabel:  # 0/1 columns in the model's order (one-hot rows from a single-label source)
        rows = images.labels if source.multilabel else \
            torch.nn.functional.one_hot(images.labels, len(source.classes))
        images.labels = rows[:, [source.classes.index(c) for c in spec.classes]]
    elif source.classes != spec.classes:  # the same classes in another order (a run extended with new
        # classes keeps its old indices): the data's labels become the model's indices
        images.labels = torch.tensor([spec.classes.index(source.classes[i]) for i in images.labels.tolist()],
                                     dtype=torch.long)
    logits = predictor.logits(images, batch_size, "evaluate")
    out = run_dir / "evaluations" / (Path(data).stem + (f"-{Path(labels).stem}" if labels and labels != cfg.data.labels
                                                        else "") + "-tta" * tta)
    out.mkdir(parents=True, exist_ok=True)
    # the evaluation records its own command, time and versions; the training run's environment
    # stays beside it, since both produced these numbers
    for f, dest in (("config.yaml", "config.yaml"), ("environment.json", "training_environment.json")):
        if (run_dir / f).is_file():
            atomic_write_bytes(out / dest, (run_dir / f).read_bytes())
    write_environment(out, cfg.train.seed)
    # --tta, a run trained with flip_views, or an ensemble saved with --tta: each scores mirrors too
    flipped = predictor.info()["tta"]
    cards = {"test-time augmentation": "flip (image and mirror, logits averaged)"} if flipped else None
    return finish_evaluation(out, cfg, spec, read_history(run_dir), logits, images.labels, images, None,
                             threshold=run_threshold(run_dir), cards=cards,
                             title=f"graftnet run {run_dir.name}: evaluation on {out.name}")


@torch.no_grad()
def predict(run_dir: str | Path, target: str | Path, top: int = 3, batch_size: int = 64,
            tta: bool = False) -> list[dict]:
    """One record per image file of `target` (a file or a folder), in order: {file, class,
    probability, top}, or {file, error} for a file in a folder that cannot be read or decoded.
    Multi-label runs: {file, labels, top}, `labels` those at or above their thresholds."""
    predictor = load_predictor(run_dir)
    if tta:
        flip_tta(predictor)
    spec, cfg = predictor.spec, resolve(Path(run_dir) / "config.yaml")
    # two-class runs also decide at the threshold they chose on their validation split
    threshold = run_threshold(Path(run_dir)) if len(spec.classes) == 2 else None
    pos = positive_index(spec.classes, cfg.eval.positive_class) if threshold is not None else 0

    def classify(paths: list[Path], squares: list) -> list[dict]:
        images = ImageSet([torch.from_numpy(a) for a in squares], torch.zeros(len(paths), dtype=torch.long),
                          [str(p) for p in paths], spec.classes)
        logits = predictor.logits(images, batch_size, "predict")
        if spec.multilabel:  # each label on its own: the labels at or above their thresholds
            return [{"file": key, **labels_above(p.tolist(), spec.classes, spec.thresholds, top)}
                    for key, p in zip(images.keys, logits.sigmoid())]
        results = []
        for key, p in zip(images.keys, logits.softmax(1)):
            results.append({"file": key, **top_classes(p, spec.classes, top)})
            if threshold is not None:
                results[-1]["at_threshold"] = {"threshold": threshold, "class": spec.classes[
                    pos if p[pos].item() >= threshold else 1 - pos]}
        return results
    return predict_files(target, list_images(target), predictor.image_size, cfg.data.grayscale, classify)


def top_classes(probs: torch.Tensor, classes: list[str], top: int = 3) -> dict:
    """{class, probability, top: [{class, probability}, ...]} for one image's probabilities."""
    values, idx = probs.topk(min(top, len(classes)))
    return {"class": classes[idx[0]], "probability": round(values[0].item(), 6),
            "top": [{"class": classes[i], "probability": round(v.item(), 6)} for v, i in zip(values, idx)]}
