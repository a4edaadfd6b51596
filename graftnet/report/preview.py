"""`graft preview`: a grid of random training images with their labels, to check the data by eye;
with an augmentation preset, each original stands beside two augmented versions of it."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..config import RunConfig
from .plots import plot_samples
from ..data.augment import make_augment
from ..data.images import config_splits, load_images, to_batch
from ..data.labels import open_data

SIZE = 128


def _augmented(augment, images: list[torch.Tensor]) -> list[torch.Tensor]:
    x = to_batch(augment.images(images), SIZE, (0, 0, 0), (1, 1, 1))  # floats in [0, 1]
    return list((augment.batch(x) * 255).round().clamp(0, 255).to(torch.uint8))


def preview(cfg: RunConfig, out: Path, n: int = 32, seed: int = 0, augment: str = "none") -> Path:
    source = open_data(cfg.data, cfg.cache_dir)
    train = config_splits(source, cfg.data)["train"]
    aug = make_augment(augment, seed)
    count = -(-n // 3) if aug else n
    pick = random.Random(seed).sample(train, min(count, len(train)))
    images = load_images(source, pick, SIZE, cfg.data.skip_bad, cfg.data.workers, gray=cfg.data.grayscale)
    labels = ["|".join(c for c, v in zip(source.classes, row) if v) or "(none)" if isinstance(row, list)
              else source.classes[row] for row in images.labels.tolist()]  # multi-label: its labels
    if aug is None:
        plot_samples(images.images, labels, out)
        return out
    aug.reseed(seed)
    first, second = _augmented(aug, images.images), _augmented(aug, images.images)
    tiles, titles = [], []
    for orig, a, b, label in zip(images.images, first, second, labels):
        tiles += [orig, a, b]
        titles += [label, f"{augment}", f"{augment}"]
    plot_samples(tiles, titles, out, ncols=6)
    return out
