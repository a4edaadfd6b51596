"""A multi-label run's closing evaluation: per-label metrics in the terminal, test_metrics.json,
per-image predictions, a per-label bar chart and report.html.

Separate from the single-label path (evaluation.finish_evaluation) because almost nothing carries
over: there is no confusion matrix, no argmax, no top-k; each label is decided at its own threshold.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_json, atomic_write_text, save_tensors
from ..multilabel import MULTILABEL_HEADER, multilabel_metrics, multilabel_rows, multilabel_summary, multilabel_table
from ..progress import console, log
from .card import write_card
from .html import write_report
from .plots import _save, plot_curves, plot_samples


def names(row, classes: list[str]) -> str:
    """The labels of a 0/1 row, '|'-joined (the label file's default separator)."""
    return "|".join(c for c, v in zip(classes, row) if v)


def finish_multilabel(run_dir: Path, cfg_dict: dict, spec, history: list[dict], logits: torch.Tensor,
                      labels: torch.Tensor, keys: list[str], train=None, prefix: str = "",
                      val_size: int | None = None, cards: dict | None = None, title: str | None = None) -> dict:
    m = multilabel_metrics(logits, labels, spec.classes, spec.thresholds)
    m["split_sizes"] = {"train": len(train) if train is not None else None, "val": val_size, "test": len(labels)}
    atomic_write_json(run_dir / f"{prefix}test_metrics.json", m)
    if len(keys) == len(logits):
        write_predictions(run_dir, prefix, logits, labels, keys, spec.classes, spec.thresholds)
    console.print(multilabel_table(m))
    images = {}
    if history:
        plot_curves(history, run_dir / "curves.png")
        images["Training curves (accuracy: each image-label decision at probability 0.5)"] = run_dir / "curves.png"
    plot_per_label(m, run_dir / f"{prefix}per_label.png")
    images["Per label (test): average precision and F1 at the label's threshold"] = run_dir / f"{prefix}per_label.png"
    if train is not None and len(train):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:32].tolist()
        plot_samples([train.images[i] for i in pick], [names(train.labels[i].tolist(), spec.classes) or "(none)"
                                                       for i in pick], run_dir / "samples.png")
        images["Training samples"] = run_dir / "samples.png"
    f = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    summary = {"test mAP": f(m["map"]), "macro F1": f(m["macro"]["f1"]), "micro F1": f(m["micro"]["f1"]),
               "macro ROC-AUC": f(m["macro"]["auc"]), "exact match": f(m["exact_match"]),
               "test images": m["n"], "labels": len(spec.classes), "backbone": spec.backbone,
               "input": f"{spec.image_size}px", "epochs": len(history), **(cards or {})}
    env_path = run_dir / "environment.json"
    tables = [("Per-label metrics (test)", multilabel_summary(m) + "; thresholds chosen on the validation "
               "split, per label, where its F1 is highest", MULTILABEL_HEADER, multilabel_rows(m))]
    write_report(run_dir / f"{prefix}report.html", title or f"graftnet run {run_dir.name}", summary, cfg_dict,
                 history, None, images, spec.classes,
                 json.loads(env_path.read_text()) if env_path.is_file() else None, tables)
    if not prefix:
        write_card(run_dir)
    log(f"test mAP {f(m['map'])}; report: {run_dir / (prefix + 'report.html')}")
    return m


def write_predictions(run_dir: Path, prefix: str, logits: torch.Tensor, labels: torch.Tensor, keys: list[str],
                      classes: list[str], thresholds: list[float]) -> None:
    """test_predictions.csv (file, true and predicted labels, every label's probability) and
    test_logits.safetensors (raw logits and 0/1 labels, in the same order)."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    probs = logits.sigmoid()
    chosen = probs >= torch.tensor(thresholds or [0.5] * len(classes))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "true", "predicted", "exact", *[f"p_{c}" for c in classes]])
    for key, y, c, p in zip(keys, labels.tolist(), chosen.tolist(), probs.tolist()):
        writer.writerow([key, names(y, classes), names(c, classes), int(list(map(bool, y)) == c),
                         *[f"{v:.6f}" for v in p]])
    atomic_write_text(run_dir / f"{prefix}test_predictions.csv", out.getvalue())
    save_tensors(run_dir / f"{prefix}test_logits.safetensors", {"logits": logits, "labels": labels},
                 {"classes": json.dumps(classes), "multilabel": "true", "rows": "as in test_predictions.csv"})


def plot_per_label(m: dict, path: Path) -> Path:
    """AP and F1 per label, side by side: where a multi-label model is weak, at a glance."""
    import matplotlib.pyplot as plt
    rows = m["per_label"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4))
    ax.bar(x - 0.2, [r["ap"] if r["ap"] is not None else 0 for r in rows], 0.4, label="AP")
    ax.bar(x + 0.2, [r["f1"] for r in rows], 0.4, label="F1 at threshold")
    ax.set_xticks(x, [r["class"] for r in rows], rotation=45 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center")
    ax.set(ylim=(0, 1.05), ylabel="score", title=f"per label (test), mAP {m['map'] or 0:.3f}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)
