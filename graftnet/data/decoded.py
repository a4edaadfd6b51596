"""Decoded images kept on disk between runs, and read from there when memory would not hold them.

Once features are cached, decoding is most of a re-run's set-up: every run of a sweep, a seed
series or `graft evaluate` opens every JPEG again (CIFAR-10: 60,000 files, ~40 s on two cores;
large photos or scans: minutes). The squares `load_images` makes are written, as they are decoded,
to a record file (records.py) per (content fingerprint, sample list, size, grayscale, skip_bad),
with an index beside it; a second run reads them instead. A damaged entry is decoded again, never
trusted; a full disk costs the cache, not the run.

Where the records go next is `data.in_memory`: `auto` reads them into memory when they take at
most a quarter of the memory still available (a cgroup's limit included), and otherwise leaves
them on disk, read per batch; `yes` and `no` force either.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..progress import log
from .images import ImageSet, label_tensor, load_images
from .records import DiskImages, available_memory
from .sources import Source

VERSION = 2  # bump when square_uint8's output or the record layout changes
MEMORY_SHARE = 0.25  # of the memory available, what decoded images may take in memory (`auto`)
_scratch: list[Path] = []


def load_images_cached(source: Source, samples: list[tuple[str, int]], size: int, skip_bad: bool,
                       workers: int, progress, gray: bool, cache_dir: Path | None,
                       in_memory: str = "auto", processes: bool = False) -> ImageSet:
    """load_images, through the record cache in cache_dir/decoded (None: records in a temporary
    folder removed at exit), placed in memory or left on disk by `in_memory`."""
    if not samples or (cache_dir is None and in_memory == "yes"):
        return load_images(source, samples, size, skip_bad, workers, progress, gray, processes=processes)
    folder = (Path(cache_dir) if cache_dir is not None else _scratch_dir()) / "decoded"
    key = _key(source, samples, size, gray, skip_bad)
    data, index = folder / f"{key}.records", folder / f"{key}.index.safetensors"
    images = _read(data, index, samples, source) if index.is_file() else None
    if images is not None:
        if progress:
            progress(len(samples))
    else:
        try:
            images = load_images(source, samples, size, skip_bad, workers, progress, gray, records=data,
                                 processes=processes)
        except OSError as e:  # no room for the records: decode into memory, as before there were any
            log(f"[yellow]decoded images not written to {folder} ({e}); the run goes on with them in memory[/]")
            return load_images(source, samples, size, skip_bad, workers, None, gray, processes=processes)
        try:
            _write(index, images, samples)
        except OSError as e:
            log(f"[yellow]decoded images' index not written ({e}); the next run decodes them again[/]")
    return placed(images, in_memory)


def decode_split(source: Source, samples, size: int, data, cache_dir: str | None, progress=None,
                 skip_bad: bool | None = None) -> ImageSet:
    """A split decoded as a run's DataConfig says (workers, grayscale, the decoded cache, memory);
    `cache_dir` is the run's (None: the default cache folder)."""
    from ..io import cache_root
    return load_images_cached(source, samples, size, data.skip_bad if skip_bad is None else skip_bad,
                              data.workers, progress, data.grayscale,
                              cache_root(cache_dir) if data.cache_decoded else None, data.in_memory,
                              data.decode_in == "processes")


def placed(images: ImageSet, in_memory: str) -> ImageSet:
    """Records read into memory (`yes`, or `auto` where they fit), or left on disk."""
    disk = images.images
    if isinstance(disk, DiskImages) and (
            in_memory == "yes" or (in_memory == "auto" and disk.nbytes <= MEMORY_SHARE * available_memory())):
        images.images = disk.load()
    return images


def _scratch_dir() -> Path:
    if not _scratch:
        _scratch.append(Path(tempfile.mkdtemp(prefix="graftnet-decoded-")))
        atexit.register(shutil.rmtree, _scratch[0], True)
    return _scratch[0]


def _key(source: Source, samples, size: int, gray: bool, skip_bad: bool) -> str:
    h = hashlib.sha256(json.dumps({"v": VERSION, "size": size, "gray": gray, "skip_bad": skip_bad,
                                   "data": source.fingerprint}).encode())
    for key, label in samples:
        h.update(f"{key}\0{label}\0".encode())
    return h.hexdigest()[:24]


def _write(index: Path, images: ImageSet, samples) -> None:
    from ..io import save_tensors
    where = {k: i for i, (k, _) in enumerate(samples)}
    disk = images.images
    save_tensors(index, {"kept": torch.tensor([where[k] for k in images.keys], dtype=torch.long),
                         "offsets": torch.from_numpy(disk.offsets), "sides": torch.from_numpy(disk.sides)},
                 {"skipped": json.dumps(images.skipped), "bytes": str(disk.nbytes)})


def _read(data: Path, index: Path, samples, source: Source) -> ImageSet | None:
    from safetensors import safe_open
    try:
        with safe_open(str(index), "pt") as f:
            kept = f.get_tensor("kept").tolist()
            offsets, sides = f.get_tensor("offsets").numpy(), f.get_tensor("sides").numpy()
            meta = f.metadata()
        total = int(offsets[-1] + 3 * sides[-1] ** 2) if len(sides) else 0
        if len(kept) != len(sides) or data.stat().st_size != total or str(total) != meta["bytes"]:
            return None
        return ImageSet(DiskImages(data, offsets, sides), label_tensor([samples[i][1] for i in kept], source),
                        [samples[i][0] for i in kept], source.classes, json.loads(meta["skipped"]))
    except Exception:  # noqa: BLE001  (damaged or foreign file: decode again)
        return None
