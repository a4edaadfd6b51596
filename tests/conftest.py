"""Shared fixtures: generated image folders, a CIFAR-10 slice, and a tiny random-weight backbone.

Generated classes differ by colour and by a stripe's orientation, so a head can learn them in a few
epochs even on a random-weight backbone: mechanics tests then assert that learning happened.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["GRAFTNET_QUIET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"
TINY = "test_efficientnet"  # timm's tiny test architecture, random weights, ~0.1M parameters
COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40), (160, 60, 200)]


def make_image(label: int, rng: np.random.Generator, size: int = 24) -> Image.Image:
    arr = rng.integers(0, 60, (size, size, 3)).astype(np.int16)
    arr += np.array(COLORS[label % len(COLORS)], dtype=np.int16) // 2
    stripe = slice(size // 3, 2 * size // 3)
    if label % 2:
        arr[stripe, :, :] += 90
    else:
        arr[:, stripe, :] += 90
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_folder(root: Path, classes=("cat", "dog", "fox"), n: int = 12, splits=None, seed: int = 0,
                ext: str = ".png") -> Path:
    """root/<class>/i.png, or root/<split>/<class>/i.png when splits maps split -> count."""
    rng = np.random.default_rng(seed)
    layout = splits or {"": n}
    for split, count in layout.items():
        for label, cls in enumerate(classes):
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(label, rng).save(d / f"{i:03d}{ext}")
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, prefix + p.relative_to(folder).as_posix() + ("/" if p.is_dir() else ""))
    return archive


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data", n=14)


@pytest.fixture
def split_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data", splits={"train": 14, "test": 6})


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def tiny_overrides(data: Path, tmp_path: Path, **extra) -> dict:
    """Config overrides for a fast run on the tiny random-weight backbone. Its final features are
    nearly constant (random weights, BatchNorm at init); the early-stage taps of "multi" carry the
    colours and stripes, so learning does not hinge on a lucky initialisation."""
    base = {"data.path": str(data), "backbone.name": TINY, "backbone.pretrained": False,
            "backbone.image_size": 32, "backbone.features": "multi", "train.epochs": 3, "train.batch_size": 8, "train.lr": 3e-3,
            "head.hidden": [32], "head.dropout": 0.0, "out": str(tmp_path / "runs"),
            "cache_dir": str(tmp_path / "cache"), "data.workers": 1}
    base.update(extra)
    return base


needs_cifar = pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason=f"{CIFAR_ZIP} not present")


LABEL_COLORS = {"red": (230, 30, 30), "green": (30, 210, 50), "blue": (30, 50, 230), "yellow": (235, 215, 30)}


def make_multilabel_folder(root: Path, n: int = 80, seed: int = 0, split_column: bool = False) -> Path:
    """root/img/<i>.png with one to three coloured stripes on grey noise, and root/labels.csv
    naming the colours present (`red|blue`): a multi-label set a random-weight backbone's early
    taps can learn."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = list(LABEL_COLORS)
    rows = ["file,labels" + (",split" if split_column else "")]
    for i in range(n):
        arr = rng.integers(60, 120, (24, 24, 3)).astype(np.int16)
        present = sorted(rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False).tolist())
        for band, c in enumerate(present):
            arr[band * 8:band * 8 + 6, :, :] = LABEL_COLORS[names[c]]
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "img" / f"{i:03d}.png")
        split = ",test" if i % 5 == 0 else ",train"
        rows.append(f"img/{i:03d}.png," + "|".join(names[c] for c in present) + (split if split_column else ""))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
