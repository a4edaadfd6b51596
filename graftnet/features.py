"""Run a frozen backbone once per image and keep its pooled features on disk.

With the backbone frozen and no augmentation, every epoch would compute the same features again:
we compute them once (bf16 autocast and channels-last where the CPU has AMX) and train the head on
them. The cache key covers everything that changes the numbers: backbone, weights, preprocessing,
feature taps, pooling, precision, and a fingerprint of the exact images.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path
from queue import Queue

import torch

from .data.images import ImageSet, to_batch
from .io import save_tensors
from .progress import bar


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (the first "flags" line of /proc/cpuinfo); empty where there is none
    (another OS, a sandbox): callers then pick what is safe everywhere."""
    try:
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name(path: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model name, for records of where something was measured."""
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(path).read_text(errors="replace").splitlines()
                     if line.startswith("model name")), None)
    except OSError:
        return None


def _cpu_flags() -> set[str]:  # the seam native_bf16 reads (tests replace it)
    return cpu_flags()


def native_bf16(device: str = "cpu", training: bool = False, dense: bool = False) -> bool:
    """True where bf16 runs fast enough to be the default: CUDA with bf16; a CPU with AMX; for
    inference (the backbone pass that fills the feature cache) also a CPU with AVX512-BF16. There
    a fine-tuning step in bf16 was slower than fp32 (0.71x, against 1.47x for inference:
    BENCHMARKS.md, the machine), so `training` asks for AMX, unless the step is `dense`: a head's
    Linear layers on cached features, matrix products that AVX512-BF16 runs 1.2-1.8x faster than
    fp32 (bench/head_precision.py). Without either (AVX2 CPUs) PyTorch emulates bf16 and a backbone
    pass gets ~10x slower."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = _cpu_flags()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and (not training or dense))


def resolve_precision(precision: str, device: str = "cpu", training: bool = False, dense: bool = False) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device, training, dense) else "fp32"
    return precision


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live: batches follow the model there."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def pick_device(name: str) -> torch.device:
    """'auto': the process's GPU when there is one (under torchrun, LOCAL_RANK's), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        import os
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def chunk_size(device: str, image_size: int, requested: int = 0) -> int:
    """Images per forward (and backward) pass; 0: the whole batch. `requested` > 0 is taken as it
    is. Else on a CPU, chunks small enough that a layer's activations stay in the processor's
    cache: Lite0's depthwise convolutions are bound by memory traffic. On this project's 2-core CPU
    (bench/micro_batch.py, BENCHMARKS.md, micro-batches) a fine-tuning step on a batch of 128 ran 1.5x
    (128 px) to 2.3x (192 px) faster in these chunks, inference 1.5-2.5x faster than in batches of
    256; at 64 px training gained nothing and lost nothing. A GPU wants the whole batch."""
    if requested > 0:
        return requested
    if device != "cpu":
        return 0
    return 32 if image_size <= 128 else 16 if image_size <= 160 else 8


def chunks(x: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """x split along the batch dimension into pieces of at most `size` (0: x whole)."""
    return x.split(size) if 0 < size < len(x) else (x,)


def autocast(precision: str, device: str = "cpu", training: bool = False):
    if resolve_precision(precision, device, training) == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def image_batches(images: ImageSet, order, batch_size: int, size: int, mean, std,
                  channels_last: bool, flip: bool = False, prefetch: int = 2, augment=None,
                  pin: bool = False, augment_seed: int | None = None, first_batch: int = 0):
    """Yield (x, y) batches; resizing and normalising run in a thread, ahead of the model (images
    are decoded once into memory, so a thread does what DataLoader workers would). `pin`: page-locked
    batches, for asynchronous copies to a GPU.
    `augment` (data/augment.py) draws from its own generator, so the thread keeps runs repeatable;
    per-image torchvision presets draw from the global one, so they run in order, unthreaded.
    `augment_seed`: each batch's augmentation is seeded from it and the batch's index in the epoch
    (`first_batch` for the first one yielded), so it depends on no batch before it: an epoch
    resumed part-way through draws what it would have drawn."""
    order = [int(i) for i in order]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if augment is not None and augment.per_image is not None:
        prefetch = 0

    def make(b, idx):
        if augment is not None and augment_seed is not None:
            augment.reseed(augment_seed * 100_003 + first_batch + b)
        imgs = [images.images[i] for i in idx]
        x = to_batch(augment.images(imgs) if augment else imgs, size, mean, std, channels_last)
        x = augment.batch(x) if augment else x
        x = x.flip(3) if flip else x
        return (x.pin_memory() if pin else x), images.labels[torch.tensor(idx, dtype=torch.long)]

    if prefetch <= 0 or len(chunks) < 2:
        for b, idx in enumerate(chunks):
            yield make(b, idx)
        return
    queue: Queue = Queue(maxsize=prefetch)
    stop = threading.Event()

    def producer():
        try:
            for b, idx in enumerate(chunks):
                if stop.is_set():
                    return
                queue.put(make(b, idx))
        except BaseException as e:  # hand the error to the consumer
            queue.put(e)
        queue.put(None)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(Exception):
                queue.get_nowait()
            thread.join(timeout=0.05)


@torch.no_grad()
def compute_features(model, images: ImageSet, size: int, mean, std, batch_size: int = 128,
                     precision: str = "bf16", channels_last: bool = True, flip: bool = False,
                     description: str = "features", augment=None, micro_batch: int = 0) -> torch.Tensor:
    """Pooled features of every image (model = GraftedModel; its extractor and pool run), each
    batch in chunks of chunk_size(device, size, micro_batch)."""
    model.eval()
    out = []
    dev = device_of(model)
    chunk = chunk_size(dev.type, size, micro_batch)
    dtype = torch.bfloat16 if resolve_precision(precision, dev.type) == "bf16" else torch.float32
    with bar(len(images), description) as advance:
        for x, _ in image_batches(images, range(len(images)), batch_size, size, mean, std,
                                  channels_last, flip, augment=augment, pin=dev.type == "cuda"):
            for xs in chunks(x.to(dev, non_blocking=True), chunk):
                with autocast(precision, dev.type):
                    out.append(model.features(xs).to("cpu", dtype))
            advance(len(x))
    return torch.cat(out) if out else torch.empty(0)


def cache_key(parts: dict, images: ImageSet, fingerprint: str) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    h.update(fingerprint.encode())
    for k in images.keys:
        h.update(k.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _load(path: Path, n: int) -> torch.Tensor | None:
    if path.is_file():
        from safetensors.torch import load_file
        try:
            feats = load_file(str(path))["features"]
            if feats.shape[0] == n:
                return feats
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    return None


def _from_superset(model, images: ImageSet, parts: dict, fingerprint: str, cache_dir: Path, kwargs: dict,
                   view) -> tuple[torch.Tensor, bool] | None:
    """Average-pooled "last" or "multi" features are columns of the "blocks" features of the same
    backbone and images (heads.FeatureExtractor.blocks_superset): read them from that cache entry, or compute and
    cache the superset, whose taps cost nothing next to the backbone pass, so the next mode is free."""
    extractor = getattr(model, "extractor", None)
    if parts.get("pool") != "avg" or parts.get("features") not in ("last", "multi") or extractor is None:
        return None
    with extractor.blocks_superset(kwargs["size"]) as found:
        if found is None:
            return None
        full, columns = found
        key = cache_key({**parts, "features": "blocks", "flip": kwargs.get("flip", False),
                         **({"view": view} if view else {})}, images, fingerprint)
        path = Path(cache_dir) / "features" / f"{key}.safetensors"
        feats = _load(path, len(images))
        if feats is not None:
            return feats[:, columns].contiguous(), True
        own = model.extractor
        model.extractor = full  # the same backbone modules, tapped at every block for this pass
        try:
            feats = compute_features(model, images, **kwargs)
        finally:
            model.extractor = own
    try:
        save_tensors(path, {"features": feats}, {"parts": json.dumps({**parts, "features": "blocks"}),
                                                 "n": str(len(images))})
    except OSError as e:  # a full disk costs the cache, not the run
        from .progress import log
        log(f"[yellow]feature cache not written ({e}); training goes on[/]")
    return feats[:, columns].contiguous(), False


def cached_features(model, images: ImageSet, parts: dict, fingerprint: str, cache_dir: Path | None,
                    **kwargs) -> tuple[torch.Tensor, bool]:
    """Features from the cache when present, else computed and stored. Returns (features, hit)."""
    view = kwargs.pop("view", None)  # (augmentation name, seed) of a cached augmented view
    if cache_dir is None:
        return compute_features(model, images, **kwargs), False
    key = cache_key({**parts, "flip": kwargs.get("flip", False), **({"view": view} if view else {})},
                    images, fingerprint)
    path = Path(cache_dir) / "features" / f"{key}.safetensors"
    feats = _load(path, len(images))
    if feats is not None:
        return feats, True
    superset = _from_superset(model, images, parts, fingerprint, cache_dir, kwargs, view)
    if superset is not None:
        return superset
    feats = compute_features(model, images, **kwargs)
    try:
        save_tensors(path, {"features": feats}, {"parts": json.dumps(parts), "n": str(len(images))})
    except OSError as e:  # a full disk costs the cache, not the run
        from .progress import log
        log(f"[yellow]feature cache not written ({e}); training goes on[/]")
    return feats, False
