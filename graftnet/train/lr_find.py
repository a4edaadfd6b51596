"""`graft lr-find`: the learning-rate range test (Smith 2017, fastai's lr_find) on the head.

The learning rate grows exponentially over a few hundred mini-batches of cached features while the
loss is recorded; the suggestion is the rate where the smoothed loss falls fastest, a little before
it blows up. The head is rebuilt afterwards: the test is only a measurement.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..heads import make_mlp
from ..io import atomic_write, atomic_write_json
from ..model import build_model
from .loop import feature_batches, make_optimizer
from .pipeline import load_data, seed_everything, split_features


def lr_range_test(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer_name: str,
                  batch_size: int, generator: torch.Generator, start: float = 1e-7, end: float = 10.0,
                  steps: int = 200, beta: float = 0.9) -> tuple[list[float], list[float]]:
    optimizer = make_optimizer(head.parameters(), optimizer_name, start, 0.0)
    factor = (end / start) ** (1 / max(1, steps - 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
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
            if not math.isfinite(smooth) or smooth > 4 * best:
                return lrs, losses  # diverged: the rest of the range says nothing
            best = min(best, smooth)
            lrs.append(lr)
            losses.append(smooth)
            if len(lrs) >= steps:
                break
    return lrs, losses


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The rate of steepest descent of the smoothed loss (per log-LR), ignoring the noisy ends."""
    if len(lrs) < 5:
        return lrs[0] if lrs else 1e-3
    lo, hi = len(lrs) // 10, max(len(lrs) // 10 + 2, len(lrs) - len(lrs) // 20)
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(lo, hi - 1)]
    return lrs[lo + min(range(len(slopes)), key=slopes.__getitem__)]


def lr_find(cfg: RunConfig, out: Path) -> float:
    generator = seed_everything(cfg.train.seed)
    source, sets = load_data(cfg)
    model, spec = build_model(cfg, source.classes)
    x = split_features(model, spec, cfg, source, sets["train"], "train")
    lrs, losses = lr_range_test(make_mlp(spec.feature_dim, spec.num_classes, cfg.head), x,
                                sets["train"].labels, cfg.train.optimizer, cfg.train.batch_size, generator)
    best = suggest(lrs, losses)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses)
    ax.axvline(best, color="red", linestyle="--", label=f"suggested {best:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    atomic_write_json(out.with_suffix(".json"), {"suggested_lr": best, "lrs": lrs, "losses": losses})
    return best
