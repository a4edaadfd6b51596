"""Two-class metrics for screening-style problems: sensitivity, specificity, ROC-AUC, and a decision
threshold chosen on the validation split and then applied, unchanged, to the test split.

The score of an image is the softmax probability of the positive class; it is called positive when
score >= threshold. ROC-AUC is computed here with numpy (the Mann-Whitney rank statistic, ties
counted half) rather than pulling in scikit-learn and SciPy for a dozen lines; tests check it
against hand-computed values.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from .errors import ConfigError

RULES = {"youden": "max Youden's J (sensitivity + specificity - 1)",
         "sensitivity": "sensitivity >= target, best specificity"}


def positive_index(classes: list[str], name: str | None) -> int:
    """Index of the positive class: `name`, or the second class in sorted order when None."""
    if len(classes) != 2:
        raise ConfigError(f"eval.positive_class is for two-class problems; this data has "
                          f"{len(classes)} classes")
    if name is None:
        return sorted(range(2), key=lambda i: classes[i])[1]
    if name not in classes:
        raise ConfigError(f"eval.positive_class: {name!r} is not a class of this data "
                          f"(classes: {', '.join(classes)})")
    return classes.index(name)


def scores(logits: torch.Tensor, pos: int) -> np.ndarray:
    return logits.detach().float().softmax(1)[:, pos].cpu().double().numpy()


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                   # rank of the last member of each group of ties
    return (ends - (counts - 1) / 2.0)[inverse]


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting 1/2; None when
    one of the classes is absent (undefined)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    rank_sum = _average_ranks(np.asarray(score, dtype=np.float64))[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(score: np.ndarray, positive: np.ndarray):
    """(fpr, tpr, thresholds): one point per distinct score, highest first, after a start at (0, 0)
    for threshold +inf (nothing called positive)."""
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(-score, kind="stable")
    s, p = score[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]   # last index of each distinct score
    tp, fp = np.cumsum(p)[last], np.cumsum(~p)[last]
    n_pos, n_neg = max(int(p.sum()), 1), max(int((~p).sum()), 1)
    return (np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last]])


def choose_threshold(score: np.ndarray, positive: np.ndarray, rule: str = "youden",
                     target: float = 0.95) -> float:
    """The decision threshold on (validation) scores. youden: the cut maximising sensitivity +
    specificity - 1 (the highest one on ties); sensitivity: the highest cut whose sensitivity reaches
    `target`, i.e. the best specificity at that sensitivity. Every threshold between the chosen
    score and the next lower one decides the validation images alike; the midpoint is returned, so
    unseen scores just below the lowest accepted one are not all turned away."""
    fpr, tpr, thr = roc_curve(score, positive)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # +inf calls nothing positive: never a useful choice
    if rule == "youden":
        j = tpr - fpr
        k = int(np.argmax(j >= j.max() - 1e-12))  # equal J up to rounding: a tie
    elif rule == "sensitivity":
        k = int(np.argmax(tpr >= target - 1e-12))  # the lowest threshold always reaches 1
    else:
        raise ConfigError(f"eval.threshold: {rule!r} is not one of {', '.join(RULES)}")
    below = thr[k + 1] if k + 1 < len(thr) else 0.0  # probabilities: nothing lies below 0
    return float((thr[k] + below) / 2)


def _div(a: int, b: int) -> float:
    return a / b if b else 0.0


def operating_point(predicted: np.ndarray, positive: np.ndarray) -> dict:
    """Sensitivity (recall of the positive class), specificity (recall of the negative one),
    precision (PPV), NPV and accuracy of yes/no decisions."""
    predicted, positive = np.asarray(predicted, dtype=bool), np.asarray(positive, dtype=bool)
    tp, fp = int((predicted & positive).sum()), int((predicted & ~positive).sum())
    fn, tn = int((~predicted & positive).sum()), int((~predicted & ~positive).sum())
    return {"sensitivity": _div(tp, tp + fn), "specificity": _div(tn, tn + fp),
            "precision": _div(tp, tp + fp), "npv": _div(tn, tn + fn),
            "accuracy": _div(tp + tn, len(positive)), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], eval_cfg,
                   val: tuple[torch.Tensor, torch.Tensor] | None = None,
                   threshold: float | None = None) -> dict:
    """AUC and the argmax operating point on the test logits; with validation logits `val`, a
    threshold chosen on them by eval_cfg's rule; with `threshold`, that one (e.g. the run's own,
    when a finished run is evaluated on other data). Both give the test metrics at the threshold."""
    pos = positive_index(classes, eval_cfg.positive_class)
    s, y = scores(logits, pos), labels.cpu().numpy() == pos
    fpr, tpr, _ = roc_curve(s, y)
    out = {"positive_class": classes[pos], "auc": roc_auc(s, y),
           "argmax": operating_point(logits.argmax(1).cpu().numpy() == pos, y),
           "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
    chosen_on = None
    if val is not None and len(val[1]):
        vs, vy = scores(val[0], pos), val[1].cpu().numpy() == pos
        if vy.any() and not vy.all():
            threshold = choose_threshold(vs, vy, eval_cfg.threshold, eval_cfg.target_sensitivity)
            chosen_on = f"validation split (n={len(vy)}): {RULES[eval_cfg.threshold]}"
            if eval_cfg.threshold == "sensitivity":
                chosen_on += f" {eval_cfg.target_sensitivity:g}"
            out["val_auc"] = roc_auc(vs, vy)
            vfpr, vtpr, _ = roc_curve(vs, vy)
            out["val_roc"] = {"fpr": vfpr.tolist(), "tpr": vtpr.tolist()}
    elif threshold is not None:
        chosen_on = "the run's validation split (threshold stored in the run's test_metrics.json)"
    if threshold is not None and chosen_on is not None:
        out["threshold"] = {"value": threshold, "rule": eval_cfg.threshold, "chosen_on": chosen_on,
                            **operating_point(s >= threshold, y)}
    return out


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def binary_rows(b: dict) -> list[list[str]]:
    """Operating points as table rows: argmax, then the chosen threshold when there is one."""
    rows = [["argmax", "—"] + [_fmt(b["argmax"][k]) for k in ("sensitivity", "specificity",
                                                              "precision", "accuracy")]]
    if "threshold" in b:
        t = b["threshold"]
        rows.append([f"threshold ({t['rule']})", f"{t['value']:.4f}"]
                    + [_fmt(t[k]) for k in ("sensitivity", "specificity", "precision", "accuracy")])
    return rows


BINARY_HEADER = ["decision", "threshold", "sensitivity", "specificity", "precision", "accuracy"]


def binary_table(b: dict) -> Table:
    table = Table(title=f"positive class {escape(b['positive_class'])}: test ROC-AUC {_fmt(b['auc'])}"
                        + (f" (validation {_fmt(b['val_auc'])})" if "val_auc" in b else ""),
                  caption=escape(f"threshold chosen on: {b['threshold']['chosen_on']}")
                  if "threshold" in b else None)
    for i, name in enumerate(BINARY_HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in binary_rows(b):
        table.add_row(*row)
    return table
