"""Classification metrics as plain JSON-ready dicts, plus Rich tables to show them."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.table import Table


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # A class never predicted (or never present) gets 0.0 rather than NaN, so the JSON stays valid.
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den != 0)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                           topk=(1, 5)) -> dict:
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    n_classes, n = len(classes), int(labels.numel())

    preds = logits.argmax(dim=1)
    confusion = torch.bincount(labels * n_classes + preds, minlength=n_classes * n_classes)
    confusion = confusion.reshape(n_classes, n_classes).numpy().astype(np.int64)

    # Top-k with k >= number of classes is trivially 1.0, so only top1 is kept in that case.
    top_k = {}
    for k in topk:
        if k == 1 or k < n_classes:
            hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
            top_k[f"top{k}"] = float(hits.float().mean()) if n else 0.0

    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = _div(tp, confusion.sum(axis=0).astype(np.float64))
    recall = _div(tp, support.astype(np.float64))
    f1 = _div(2 * precision * recall, precision + recall)

    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "accuracy_ci95": wilson_interval(int(tp.sum()), n),
        "top_k": top_k,
        "loss": float(F.cross_entropy(logits, labels)) if n else 0.0,
        "n": n,
        "per_class": [
            {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        ],
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                  "f1": float(f1.mean())},
        "confusion": confusion.tolist(),
    }


Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson_interval(correct: int, n: int, z: float = Z95) -> list[float]:
    """95% Wilson score interval of an accuracy measured on n images: how far it could move on
    another test set of the same size (10,000 images: about +-0.5 points at 93%). Wilson, not the
    normal approximation, so that it stays inside [0, 1] near 100% and on small test sets."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


# Class names come from folder names; escape() stops Rich reading "[...]" in them as markup.


def metrics_table(m: dict, classes) -> Table:
    topk = "  ".join(f"{k} {v:.4f}" for k, v in m["top_k"].items())
    lo, hi = m["accuracy_ci95"]
    table = Table(title=f"accuracy {m['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f})  {topk}  (n={m['n']})")
    table.add_column("class")
    for name in ("precision", "recall", "F1", "support"):
        table.add_column(name, justify="right")
    for row in m["per_class"]:
        table.add_row(escape(str(row["class"])), f"{row['precision']:.4f}", f"{row['recall']:.4f}",
                      f"{row['f1']:.4f}", str(row["support"]))
    macro = m["macro"]
    table.add_section()
    table.add_row("macro", f"{macro['precision']:.4f}", f"{macro['recall']:.4f}",
                  f"{macro['f1']:.4f}", str(m["n"]), style="bold")
    return table


def _abbrev(name: str, width: int = 8) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def confusion_table(m: dict, classes) -> Table:
    table = Table(title="confusion (rows = true, columns = predicted)")
    table.add_column("true \\ pred")
    for c in classes:
        table.add_column(escape(_abbrev(str(c))), justify="right")
    for i, (c, row) in enumerate(zip(classes, m["confusion"])):
        # Highlight the diagonal so correct predictions stand out from the errors.
        cells = [f"[bold green]{v}[/]" if i == j else (str(v) if v else "[dim]0[/]")
                 for j, v in enumerate(row)]
        table.add_row(escape(str(c)), *cells)
    return table
