"""PNG plots for the run report: training curves, confusion matrix, sample predictions."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must be set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from graftnet.io import atomic_write  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110,
                                                          bbox_inches="tight"))
    finally:
        plt.close(fig)  # figures are kept alive by pyplot until closed


def stage_marks(history: list[dict]) -> list[tuple[float, str]]:
    """(x, name) where a stage begins: half an epoch before its first epoch (the boundary between
    two epochs' points). Rows without a stage belong to the unnamed first stage."""
    marks, current = [], None
    for row in history:
        if row.get("stage") != current:
            current = row.get("stage")
            if current:
                marks.append((row["epoch"] - 0.5, current))
    return marks


def plot_curves(history: list[dict], path: str | Path) -> Path:
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for x, name in stage_marks(history):  # e.g. where fine-tuning starts, or each pruning step
        for ax in axes:
            ax.axvline(x, color="0.5", linestyle="--", linewidth=1)
        axes[1].annotate(name, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                         textcoords="offset points", va="top", fontsize=8, color="0.35", rotation=90)
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        val = np.array([row.get(f"val_{key}", math.nan) for row in history], dtype=float)
        if not np.isnan(val).all():  # runs without a validation split have only NaN here
            ax.plot(epochs, val, "s-", label="validation")
        ax.set(title=title, xlabel="epoch", ylabel=key if key == "loss" else "accuracy")
        if len(epochs) <= 15:  # few epochs: one tick each (also avoids 0.96, 0.98, ... for 1 epoch)
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)  # never "1e-8+3.33e-1" for a flat curve
        lo, hi = ax.get_ylim()
        if hi - lo < 0.02:  # a flat curve: a readable band around it, not float noise magnified
            mid = (lo + hi) / 2
            ax.set_ylim(mid - 0.05, mid + 0.05)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path,
                   normalize: bool = True) -> Path:
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals != 0)
    else:
        values = counts.astype(float)

    size = min(max(4.0, 0.55 * n + 2.5), 16.0)  # grow with the class count, within reason
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    vmax = 1.0 if normalize else max(values.max(), 1.0)
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                 label="fraction of true class" if normalize else "count")

    if n <= 20:  # beyond that the numbers no longer fit in the cells
        fontsize = 10 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                # White text on dark cells, dark text on light ones.
                color = "white" if values[i, j] > 0.55 * vmax else "#222222"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                        color=color, fontsize=fontsize)

    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=classes)
    ax.set(xlabel="predicted", ylabel="true",
           title="Confusion matrix" + (" (row-normalised, counts shown)" if normalize else ""))
    return _save(fig, path)


def _fit(title: str, width: int = 24) -> str:
    # Long class names would run into the neighbouring titles; shorten each line instead.
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…"
                     for line in title.split("\n"))


def plot_samples(images: list[torch.Tensor], titles: list[str], path: str | Path,
                 colors: list[str] | None = None, ncols: int = 8, suptitle: str | None = None) -> Path:
    ncols = max(1, min(ncols, len(images)))
    nrows = max(1, math.ceil(len(images) / ncols))
    lines = max((t.count("\n") + 1 for t in titles), default=1)  # taller rows for longer titles
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, (1.6 + 0.15 * lines) * nrows), squeeze=False,
                             layout="constrained")  # room for every row's titles and the heading
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        # Nearest-neighbour keeps tiny (e.g. 32x32) images crisp instead of blurred.
        ax.imshow(images[k].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(_fit(titles[k]), fontsize=7, color=colors[k] if colors else "black")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def grid_picks(logits: torch.Tensor, labels: torch.Tensor, n: int = 32) -> list[int]:
    """Which test images the predictions grid shows: the mistakes with the highest loss first
    (fastai's top losses: the true class got the least probability), then, when there are fewer
    than n mistakes, the right answers the model was surest of. Random images would mostly show
    easy right answers; these show what the model gets wrong and how sure it was."""
    probs = logits.detach().float().softmax(1)
    labels = labels.long()
    known = labels >= 0  # unlabeled images have neither a loss nor a verdict
    p_true = probs.gather(1, labels.clamp(min=0).view(-1, 1)).squeeze(1)
    conf, preds = probs.max(1)
    wrong = (known & (preds != labels)).nonzero().flatten().tolist()
    right = (known & (preds == labels)).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: (p_true[i].item(), -conf[i].item(), i))
    right.sort(key=lambda i: (-conf[i].item(), i))
    return (wrong + right)[:n]


def _prob(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else "<0.01"  # not "0.00": the model did give it something


def _name(name: str, room: int) -> str:
    # shorten the class name, not the line: the probability after it must stay in view
    return name if len(name) <= room else name[: room - 1] + "…"


def plot_predictions(images: list[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
                     classes: list[str], path: str | Path, n: int = 32) -> Path:
    """The grid of `grid_picks`: each image with its verdict in words (not only in colour), the
    predicted class and its probability, and for a mistake the true class and its probability."""
    probs = logits.detach().float().softmax(1)
    labels = labels.long()
    picks = grid_picks(logits, labels, n)
    titles, colors, shown = [], [], 0
    for i in picks:
        y, p = int(labels[i]), int(probs[i].argmax())
        if p != y:  # room for the name: 24 characters a line, less "pred: " and " 0.97"
            titles.append(f"✗ wrong\npred: {_name(classes[p], 13)} {_prob(probs[i, p])}\n"
                          f"true: {_name(classes[y], 13)} {_prob(probs[i, y])}")
            colors.append("#c62828")
            shown += 1
        else:
            titles.append(f"✓ right\n{_name(classes[p], 19)} {_prob(probs[i, p])}")
            colors.append("#2e7d32")
    total = int(((labels >= 0) & (probs.argmax(1) != labels)).sum())
    heading = (f"{shown} of the {total} mistakes" if shown < total else
               f"all {total} mistake{'s' * (total != 1)}" if total else "no mistakes") + \
        (", highest loss first" if shown > 1 else "")
    if shown < len(picks):
        right = len(picks) - shown
        heading += f"; then the {right} right answer{'s' * (right != 1)} the model was surest of"
    return plot_samples([images[i] for i in picks], titles, path, colors, suptitle=heading)


def plot_roc(fpr, tpr, auc: float | None, path: str | Path, points: dict | None = None,
             val: tuple | None = None, positive: str = "positive") -> Path:
    """ROC curve of a two-class run; `points` marks operating points {label: (fpr, tpr)}; `val`
    (fpr, tpr) adds the validation split's curve, on which the threshold was chosen."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if val is not None:
        ax.plot(val[0], val[1], color="#999999", lw=1.2, label="validation")
    label = "test" + (f" (AUC {auc:.3f})" if auc is not None else "")
    ax.plot(fpr, tpr, lw=2, label=label)
    for (name, (x, y)), marker in zip((points or {}).items(), "osD^v"):
        ax.plot([x], [y], marker, ms=8, label=f"{name}: sens {y:.3f}, spec {1 - x:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel=f"sensitivity (true positive rate, {positive})", title="ROC curve")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
