"""`graft preview`: a grid of random training images with their labels, to check the data by eye."""
from __future__ import annotations

import random
from pathlib import Path

from ..config import RunConfig
from ..report.plots import plot_samples
from .images import load_images, make_splits
from .sources import open_source


def preview(cfg: RunConfig, out: Path, n: int = 32, seed: int = 0) -> Path:
    source = open_source(cfg.data.path, cfg.cache_dir)
    train = make_splits(source, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed,
                        cfg.data.max_per_class)["train"]
    pick = random.Random(seed).sample(train, min(n, len(train)))
    images = load_images(source, pick, 128, cfg.data.skip_bad, cfg.data.workers)
    plot_samples(images.images, [source.classes[i] for i in images.labels.tolist()], out)
    return out
