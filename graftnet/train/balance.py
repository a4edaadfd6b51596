"""Class imbalance: inverse-frequency weights in the loss, or a class-balanced sampler.

Medical sets are often lopsided (the Kaggle chest X-rays: about 3 pneumonia images per normal one).
Two standard remedies, usable alone or together:
- `train.class_weights: balanced` weighs class c by n / (k * n_c) in the cross-entropy (sklearn's
  "balanced" rule): a mistake on a rare class costs as much in total as one on a common class.
- `train.sampler: balanced` draws each epoch's n training samples with replacement, each with
  probability proportional to 1 / n_c of its class, so classes come up equally often (PyTorch's
  WeightedRandomSampler rule), on the cached-features path and on the images path alike.
"""
from __future__ import annotations

import torch


def class_counts(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.bincount(labels.long(), minlength=n_classes)


def class_weights(labels: torch.Tensor, n_classes: int, mode: str) -> torch.Tensor | None:
    """Cross-entropy weights per class, or None for `none`. A class without training samples gets 0
    (it cannot be weighed up; load_data refuses such sets anyway)."""
    if mode == "none":
        return None
    counts = class_counts(labels, n_classes).double()
    weights = torch.where(counts > 0, len(labels) / (n_classes * counts.clamp(min=1)), 0.0)
    return weights.float()


def epoch_order(labels: torch.Tensor, generator: torch.Generator, mode: str = "none") -> torch.Tensor:
    """The indices one training epoch visits: a permutation, or n class-balanced draws."""
    n = len(labels)
    if mode == "none":
        return torch.randperm(n, generator=generator)
    counts = class_counts(labels, int(labels.max()) + 1 if n else 0).double()
    weights = 1.0 / counts[labels.long()]
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def positive_weights(labels: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Multi-label (N x C 0/1 labels): BCE's pos_weight per label, negatives / positives, so each
    label's positives weigh as much in total as its negatives (`balanced`); None for `none`. A
    label without training positives gets 1 (load_data refuses such sets anyway)."""
    if mode == "none":
        return None
    pos = labels.double().sum(0)
    return torch.where(pos > 0, (len(labels) - pos) / pos.clamp(min=1), 1.0).float()
