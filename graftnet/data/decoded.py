"""Decoded images kept on disk between runs.

Once features are cached, decoding is most of a re-run's set-up: every run of a sweep, a seed
series or `graft evaluate` opens every JPEG again (CIFAR-10: 60,000 files, ~40 s on two cores;
large photos or scans: minutes). The squares `load_images` makes are stored as one safetensors file
per (content fingerprint, sample list, size, grayscale, skip_bad), so a second run reads raw uint8
tensors instead. A damaged entry is decoded again, never trusted; a full disk costs the cache,
not the run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..progress import log
from .images import ImageSet, load_images
from .sources import Source

VERSION = 1  # bump when square_uint8's output changes


def load_images_cached(source: Source, samples: list[tuple[str, int]], size: int, skip_bad: bool,
                       workers: int, progress, gray: bool, cache_dir: Path | None) -> ImageSet:
    """load_images, through the cache in cache_dir/decoded (None: no cache)."""
    if cache_dir is None or not samples:
        return load_images(source, samples, size, skip_bad, workers, progress, gray)
    path = Path(cache_dir) / "decoded" / f"{_key(source, samples, size, gray, skip_bad)}.safetensors"
    if path.is_file():
        cached = _read(path, samples, source.classes)
        if cached is not None:
            if progress:
                progress(len(samples))
            return cached
    images = load_images(source, samples, size, skip_bad, workers, progress, gray)
    try:
        _write(path, images, samples)
    except OSError as e:
        log(f"[yellow]decoded images not cached ({e}); the run goes on[/]")
    return images


def _key(source: Source, samples, size: int, gray: bool, skip_bad: bool) -> str:
    h = hashlib.sha256(json.dumps({"v": VERSION, "size": size, "gray": gray, "skip_bad": skip_bad,
                                   "data": source.fingerprint}).encode())
    for key, label in samples:
        h.update(f"{key}\0{label}\0".encode())
    return h.hexdigest()[:24]


def _write(path: Path, images: ImageSet, samples) -> None:
    from ..io import save_tensors
    index = {k: i for i, (k, _) in enumerate(samples)}
    tensors = {"kept": torch.tensor([index[k] for k in images.keys], dtype=torch.long)}
    if images.images and all(im.shape == images.images[0].shape for im in images.images):
        tensors["images"] = torch.stack(images.images)  # the usual case: one block
    else:
        tensors.update({f"image/{i}": im for i, im in enumerate(images.images)})
    save_tensors(path, tensors, {"skipped": json.dumps(images.skipped)})


def _read(path: Path, samples, classes: list[str]) -> ImageSet | None:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            kept = f.get_tensor("kept").tolist()
            if "images" in f.keys():
                images = list(f.get_tensor("images").unbind(0))
            else:
                images = [f.get_tensor(f"image/{i}") for i in range(len(kept))]
            skipped = json.loads(f.metadata()["skipped"])
        if len(images) != len(kept) or (images and images[0].dtype != torch.uint8):
            return None
        return ImageSet(images, torch.tensor([samples[i][1] for i in kept], dtype=torch.long),
                        [samples[i][0] for i in kept], classes, skipped)
    except Exception:  # noqa: BLE001  (damaged or foreign file: decode again)
        return None
