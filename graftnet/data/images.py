"""Decoding, splitting and batching images.

Images are decoded once, converted to RGB whatever their mode, centre-cropped to a square and kept
as uint8 at min(short side, input size): a 32 px CIFAR image stays 32 px (3 KB) and is resized to
the backbone's input size batch by batch, so 60k images cost 180 MB, not 3 GB. They are kept in
memory, or in a record file read per batch (records.py) where memory would not hold them
(decoded.py decides); an ImageSet reads the same either way.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError
from .decoding import decoded_chunks
from .pixels import decode, grayscale, square_array, to_rgb  # noqa: F401 (re-exported)
from .records import RecordWriter, join, pick
from .sources import Source


@dataclass
class ImageSet:
    images: Sequence[torch.Tensor]  # uint8, 3 x h x w, square: a list, or records read from disk
    labels: torch.Tensor            # int64 class indices; multi-label: N x C int64, 0/1 per class
    keys: list[str]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # "file: reason" for files left out

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "ImageSet":
        idx = list(idx)
        return ImageSet(pick(self.images, idx), self.labels[idx], [self.keys[i] for i in idx], self.classes)

    def joined(self, other: "ImageSet") -> "ImageSet":
        """This set followed by `other` (e.g. labeled images, then unlabeled ones labeled -1)."""
        return ImageSet(join(self.images, other.images), torch.cat([self.labels, other.labels]),
                        self.keys + other.keys, self.classes, self.skipped + other.skipped)


def square_uint8(img: Image.Image, max_size: int) -> torch.Tensor:
    """Centre square crop, shrunk to max_size when larger; never enlarged here."""
    return torch.from_numpy(square_array(img, max_size))


def load_images(source: Source, samples: list[tuple[str, int]], size: int, skip_bad: bool = False,
                workers: int = 2, progress=None, gray: bool = False, records: Path | None = None,
                processes: bool = False) -> ImageSet:
    """Decode `samples` into uint8 squares. `records`: write them to that record file as they are
    decoded and read them from it per batch (data/records.py), instead of holding them in memory.
    `processes`: decode in `workers` worker processes instead of threads (data/decoding.py)."""
    writer = RecordWriter(records) if records is not None else None
    blocks, labels, keys, skipped = [], [], [], []
    try:
        for chunk, (blob, sides, errors) in decoded_chunks(source, samples, size, gray, workers, processes):
            for (key, label), err in zip(chunk, errors):
                if err is None:
                    labels.append(label)
                    keys.append(key)
                elif not skip_bad:
                    raise DataError(f"{err}; remove it or pass --skip-bad")
                else:
                    skipped.append(err)
            if writer is not None:
                writer.add_block(blob, sides)
            else:
                blocks.append((torch.from_numpy(blob), sides))
            if progress:
                progress(len(chunk))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    images = writer.finish() if writer is not None else _split(blocks)
    return ImageSet(images, label_tensor(labels, source), keys, source.classes, skipped)


def label_tensor(labels: list, source: Source) -> torch.Tensor:
    """Sample labels as a tensor: class indices, or for a multi-label source N x C 0/1 rows (also
    when there are none, so that an empty split still has C columns)."""
    if source.multilabel:
        return torch.tensor(labels, dtype=torch.long).view(len(labels), len(source.classes))
    return torch.tensor(labels, dtype=torch.long)


def _strata(samples: list[tuple[str, int | tuple]]) -> list[int]:
    """The class each sample is stratified by: its label, or for a multi-label sample (a 0/1 tuple)
    its rarest label among `samples` (ties: the first class; no label at all: -1). Stratifying by
    the rarest label is a deterministic proxy for iterative stratification: every rare label keeps
    its share in each split, which matters most (a split without a label has no AP for it), while
    the common labels, carried by many rows, spread evenly anyway."""
    if not samples or not isinstance(samples[0][1], tuple):
        return [s[1] for s in samples]
    counts = [sum(col) for col in zip(*(s[1] for s in samples))]
    return [min((i for i, v in enumerate(s[1]) if v), key=lambda i: (counts[i], i), default=-1)
            for s in samples]


def _by_stratum(samples) -> dict[int, list]:
    by_class: dict[int, list] = {}
    for s, stratum in zip(samples, _strata(samples)):
        by_class.setdefault(stratum, []).append(s)
    return by_class


def _split(blocks) -> list[torch.Tensor]:
    out = []
    for blob, sides in blocks:
        at = 0
        for s in sides:
            out.append(blob[at:at + 3 * s * s].view(3, s, s))
            at += 3 * s * s
    return out


def stratified_split(samples: list[tuple[str, int]], fraction: float, seed: int):
    """Split samples into (rest, held-out) keeping each class's share; deterministic for a seed."""
    by_class = _by_stratum(samples)
    rng = random.Random(seed)
    rest, held = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n = int(round(len(items) * fraction)) if fraction > 0 else 0
        if fraction > 0 and len(items) > 1:
            n = min(max(n, 1), len(items) - 1)
        held += items[:n]
        rest += items[n:]
    return rest, held


def limit_per_class(samples, n: int | None, seed: int):
    if n is None:
        return samples
    rng = random.Random(seed)
    by_class = _by_stratum(samples)  # multi-label: at most n rows per rarest label
    out = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        out += items[:n]
    return out


def make_splits(source: Source, val_fraction: float, test_fraction: float, seed: int,
                max_per_class: int | None = None) -> dict[str, list[tuple[str, int]]]:
    """train / val / test sample lists. The test split is the source's own when it has one."""
    s = source.splits
    if "train" in s:
        train = limit_per_class(s["train"], max_per_class, seed)
        test_name = "test" if "test" in s else "val"
        if test_name in s:
            test = limit_per_class(s[test_name], max_per_class, seed)
        else:
            train, test = stratified_split(train, test_fraction, seed)
        if "test" in s and "val" in s:
            val = limit_per_class(s["val"], max_per_class, seed)
        else:
            train, val = stratified_split(train, val_fraction, seed + 1)
    else:
        everything = limit_per_class(s["all"], max_per_class, seed)
        rest, test = stratified_split(everything, test_fraction, seed)
        train, val = stratified_split(rest, val_fraction, seed + 1)
    if not train:
        raise DataError(f"{source.location}: no training images")
    return {"train": train, "val": val, "test": test}


def config_splits(source: Source, data) -> dict[str, list[tuple[str, int]]]:
    """make_splits with a DataConfig's fractions, split seed and slice: the one split a run uses."""
    return make_splits(source, data.val_fraction, data.test_fraction, data.split_seed, data.max_per_class)


def to_batch(images: list[torch.Tensor], size: int, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 squares -> normalised float batch at size x size (bilinear, antialiased when shrinking)."""
    if all(im.shape == images[0].shape for im in images):
        return normalise(torch.stack(images).float(), size, mean, std, channels_last)
    x = torch.cat([F.interpolate(im[None].float(), size=(size, size), mode="bilinear",
                                 antialias=im.shape[-1] > size, align_corners=False)
                   for im in images])
    return normalise(x, size, mean, std, channels_last)


def normalise(x: torch.Tensor, size: int, mean, std, channels_last: bool = False) -> torch.Tensor:
    """Float pixels (0..255, N x 3 x H x W, any device) -> resized to size x size, normalised."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=x.shape[-1] > size,
                          align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255
    sd = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255
    x = (x - m) / sd
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
