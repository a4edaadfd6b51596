"""`graft lr-find`: the learning-rate range test (Smith 2017, fastai's lr_find) on the head.

The learning rate grows exponentially over a few hundred mini-batches of cached features while the
loss is recorded, until the loss diverges. The suggestion is the middle of the valley: the stretch
of log-rates over which the smoothed loss falls to its minimum. The head is rebuilt afterwards: the
test is only a measurement.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..errors import ConfigError
from ..heads import make_mlp
from ..io import atomic_write, atomic_write_json
from ..model import build_model
from .inputs import load_data, seed_everything, split_features
from .loop import feature_batches
from .optim import make_optimizer

# Divergence: the smoothed loss doubled from its best. fastai stops at 4x, but a head whose weights
# blew up predicts one class and its loss sits near chance, ln(classes): on CIFAR-10 (best about
# 0.8, chance 2.3) that never reaches 4x the best, so the test ran on to lr 10 and the steepest
# "descent" it reported was the way down from a later spike.
DIVERGED = 2.0
# The valley starts where the loss has made this share of its fall from the highest point before
# the minimum to the minimum: on the flat start the "descent" is noise.
VALLEY_START = 0.1
STEPS = 200


def lr_range_test(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer_name: str,
                  batch_size: int, generator: torch.Generator, start: float = 1e-7, end: float = 10.0,
                  steps: int = STEPS, beta: float = 0.9) -> tuple[list[float], list[float]]:
    """(learning rates, bias-corrected running mean of the loss), stopped at divergence."""
    optimizer = make_optimizer(head.parameters(), optimizer_name, start, 0.0)
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, avg, best, first = [], [], 0.0, math.inf, None
    head.train()
    while len(lrs) < steps:
        for xb, yb in feature_batches(x, y, batch_size, generator):
            lr = start * factor ** len(lrs)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(head(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            avg = beta * avg + (1 - beta) * loss.item()
            smooth = avg / (1 - beta ** (len(lrs) + 1))  # bias-corrected running mean
            first = smooth if first is None else first
            # Diverged: doubled from the best, or back above the starting loss after a fall of a
            # quarter or more (many classes: chance is under twice the best). The rest of the range
            # says nothing about training, only how a broken head's loss jumps about.
            if not math.isfinite(smooth) or smooth > DIVERGED * best or \
                    (best < 0.75 * first and smooth > first):
                return lrs, losses
            best = min(best, smooth)
            lrs.append(lr)
            losses.append(smooth)
            if len(lrs) >= steps:
                break
    return lrs, losses


def valley(losses: list[float]) -> tuple[int, int]:
    """(first, last) index of the valley: from where the loss starts to fall in earnest to its
    minimum. Everything after the minimum (divergence, spikes) is left out."""
    low = min(range(len(losses)), key=losses.__getitem__)
    top = max(losses[:low + 1])
    level = losses[low] + (1 - VALLEY_START) * (top - losses[low])
    return max(i for i in range(low + 1) if losses[i] >= level), low


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The middle of the valley in log-rate, where fastai's valley rule also lands (start + 1/3 +
    1/6 of its length): the rate at the minimum is already at the edge, a little further and the
    loss rises.
    On CIFAR-10 features (EfficientNet-Lite0, 1,800 images) this gives 2e-3 for Adam and 2e-2 to
    3e-2 for SGD, within 1.5 points of the best validation accuracy of a sweep of fixed rates.
    fastai's valley, which begins on the flat start, gave 3e-4 (as good) and 2e-3 (ten points
    short with SGD)."""
    if len(lrs) < 5:
        return lrs[0] if lrs else 1e-3
    a, b = valley(losses)
    return lrs[(a + b) // 2]


def lr_find(cfg: RunConfig, out: Path) -> float:
    generator = seed_everything(cfg.train.seed)
    source, sets = load_data(cfg)
    if source.multilabel:  # the range test steps a cross-entropy head
        raise ConfigError(f"{cfg.data.labels}: multi-label data; lr-find measures the single-label "
                          "(cross-entropy) loss: try a few rates with `graft train --early-stopping` instead")
    model, spec = build_model(cfg, source.classes)
    x = split_features(model, spec, cfg, source, sets["train"], "train")
    lrs, losses = lr_range_test(make_mlp(spec.feature_dim, spec.num_classes, cfg.head), x,
                                sets["train"].labels, cfg.train.optimizer, cfg.train.batch_size, generator)
    best = suggest(lrs, losses)
    a, low = valley(losses) if lrs else (0, 0)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses)
    if lrs:
        ax.axvspan(lrs[a], lrs[low], color="tab:green", alpha=0.08, label="valley")
        ax.plot([lrs[low]], [losses[low]], "o", color="black", label=f"lowest loss at {lrs[low]:.2e}")
    ax.axvline(best, color="red", linestyle="--", label=f"suggested {best:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    atomic_write_json(out.with_suffix(".json"), {
        "suggested_lr": best, "lrs": lrs, "losses": losses,
        "min_loss_lr": lrs[low] if lrs else None, "valley": [lrs[a], lrs[low]] if lrs else None,
        # a range that ended early stopped at divergence; one that ran to the end never diverged
        "diverged": len(lrs) < STEPS})
    return best
