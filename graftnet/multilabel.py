"""Multi-label metrics: per-label ROC-AUC, average precision and F1 at a threshold chosen per label
on the validation split; mAP; macro and micro F1. Plain JSON-ready dicts and a Rich table.

Each label is its own two-class problem scored by sigmoid(logit). A label with no positive (or no
negative) image in a split has no AP (or no AUC) there: it is reported as null and left out of the
means, rather than counted as 0 or 1. scikit-learn's implementations are used so that the numbers
match what a reader would compute with the usual tool.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
from rich.markup import escape
from rich.table import Table

# torch is imported where it is used: the ONNX predictor (export/runtime.py, torch-free) reads
# `labels_above` from here too.
if TYPE_CHECKING:
    import torch

DEFAULT_THRESHOLD = 0.5  # a label without positives on validation: the sigmoid's midpoint


def labels_above(probs, classes: list[str], thresholds: list[float] | None, top: int = 3) -> dict:
    """One image's answer: {labels: [{class, probability}] at or above their thresholds, most
    probable first; top: the `top` most probable labels whatever their thresholds}."""
    probs = [float(p) for p in probs]
    t = thresholds or [DEFAULT_THRESHOLD] * len(classes)
    order = sorted(range(len(classes)), key=lambda i: -probs[i])
    entry = lambda i: {"class": classes[i], "probability": round(probs[i], 6)}  # noqa: E731
    return {"labels": [entry(i) for i in order if probs[i] >= t[i]], "top": [entry(i) for i in order[:top]]}


def _arrays(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    probs = logits.detach().float().cpu().sigmoid().numpy()
    return probs, labels.detach().cpu().numpy().reshape(probs.shape).astype(np.int64)


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    import torch.nn.functional as F
    if not len(labels):
        return float("nan")
    return float(F.binary_cross_entropy_with_logits(logits.float().cpu(), labels.float().cpu()))


def _ap(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import average_precision_score
    return float(average_precision_score(y, p)) if y.any() else None


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def mean_ap(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over labels of average precision (labels without positives left out); NaN if none."""
    probs, y = _arrays(logits, labels)
    aps = [a for c in range(y.shape[1]) if (a := _ap(y[:, c], probs[:, c])) is not None] if len(y) else []
    return float(np.mean(aps)) if aps else float("nan")


def choose_thresholds(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per label, the probability threshold that maximises that label's F1 on these (validation)
    logits; DEFAULT_THRESHOLD where the split has no positive for it."""
    from sklearn.metrics import precision_recall_curve
    probs, y = _arrays(logits, labels)
    out = []
    for c in range(probs.shape[1]):
        if not len(y) or not y[:, c].any():
            out.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, thresholds = precision_recall_curve(y[:, c], probs[:, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        t = float(thresholds[int(np.argmax(f1))])
        # halfway down to the next lower score: the weakest positive's exact score would fit the
        # validation split too closely (a test positive scored a hair lower would be missed)
        below = probs[:, c][probs[:, c] < t]
        out.append(round((t + float(below.max())) / 2 if below.size else t, 6))
    return out


def _prf(tp, fp, fn) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return float(p), float(r), float(2 * p * r / (p + r)) if p + r else 0.0


def multilabel_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                       thresholds: list[float] | None = None) -> dict:
    """Test metrics of a multi-label model; decisions at `thresholds` (probabilities, one per label)."""
    probs, y = _arrays(logits, labels)
    t = np.asarray(thresholds if thresholds else [DEFAULT_THRESHOLD] * len(classes), dtype=np.float64)
    pred = probs >= t
    per_label = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's warnings on a label absent from the split
        for c, name in enumerate(classes):
            yc, pc = y[:, c], pred[:, c]
            tp, fp, fn = int((pc & (yc == 1)).sum()), int((pc & (yc == 0)).sum()), int((~pc & (yc == 1)).sum())
            p, r, f1 = _prf(tp, fp, fn)
            per_label.append({"class": name, "auc": _auc(yc, probs[:, c]), "ap": _ap(yc, probs[:, c]),
                              "f1": f1, "precision": p, "recall": r, "threshold": float(t[c]),
                              "support": int(yc.sum())})
    tp, fp, fn = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    micro = dict(zip(("precision", "recall", "f1"), _prf(tp, fp, fn)))
    aps = [r["ap"] for r in per_label if r["ap"] is not None]
    aucs = [r["auc"] for r in per_label if r["auc"] is not None]
    n = int(len(y))
    return {
        "task": "multilabel",
        "n": n,
        "loss": bce_loss(logits, labels),
        "map": float(np.mean(aps)) if aps else None,
        "macro": {"precision": float(np.mean([r["precision"] for r in per_label])),
                  "recall": float(np.mean([r["recall"] for r in per_label])),
                  "f1": float(np.mean([r["f1"] for r in per_label])),
                  "auc": float(np.mean(aucs)) if aucs else None},
        "micro": micro,
        # every label of an image right at once (scikit-learn's subset accuracy)
        "exact_match": float((pred == (y == 1)).all(1).mean()) if n else 0.0,
        "label_accuracy": float((pred == (y == 1)).mean()) if n else 0.0,
        "per_label": per_label,
    }


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def multilabel_rows(m: dict) -> list[list]:
    """Per-label rows (label, AUC, AP, F1, precision, recall, threshold, support) for tables."""
    return [[r["class"], _f(r["auc"]), _f(r["ap"]), f"{r['f1']:.4f}", f"{r['precision']:.4f}",
             f"{r['recall']:.4f}", f"{r['threshold']:.3f}", str(r["support"])] for r in m["per_label"]]


MULTILABEL_HEADER = ["label", "AUC", "AP", "F1", "precision", "recall", "threshold", "support"]


def multilabel_summary(m: dict) -> str:
    return (f"mAP {_f(m['map'])}  macro F1 {m['macro']['f1']:.4f}  micro F1 {m['micro']['f1']:.4f}  "
            f"macro AUC {_f(m['macro']['auc'])}  exact match {m['exact_match']:.4f}  (n={m['n']})")


def multilabel_table(m: dict) -> Table:
    table = Table(title=multilabel_summary(m))
    for i, name in enumerate(MULTILABEL_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in multilabel_rows(m):  # label names come from the user's file: no Rich markup in them
        table.add_row(escape(row[0]), *row[1:])
    table.add_section()
    macro = m["macro"]
    table.add_row("macro", _f(macro["auc"]), _f(m["map"]), f"{macro['f1']:.4f}", f"{macro['precision']:.4f}",
                  f"{macro['recall']:.4f}", "", str(m["n"]), style="bold")
    micro = m["micro"]
    table.add_row("micro", "", "", f"{micro['f1']:.4f}", f"{micro['precision']:.4f}", f"{micro['recall']:.4f}",
                  "", "", style="bold")
    return table
