"""What a run trains on: its data splits, decoded, and the frozen backbone's cached features of them.

Shared by every command that trains or scores a run's data (train and finetune, distillation,
pruning, QAT, lr-find), so none of them reaches into the pipeline for it.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from ..backbones import get_spec
from ..binary import positive_index
from ..config import RunConfig
from ..data.augment import make_augment
from ..data.decoded import decode_split
from ..data.images import ImageSet, config_splits
from ..data.labels import open_data
from ..data.sources import Source
from ..errors import DataError
from ..io import cache_root
from ..model import ModelSpec
from ..progress import bar, log
from .distributed import barrier, is_main
from ..features import cached_features, pick_device, resolve_precision


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def load_data(cfg: RunConfig, source: Source | None = None) -> tuple[Source, dict[str, ImageSet]]:
    """`source`: cfg.data.path already opened (a caller that read its classes first)."""
    source = source or open_data(cfg.data, cfg.cache_dir)
    splits = config_splits(source, cfg.data)
    size = cfg.backbone.image_size or get_spec(cfg.backbone.name).input_size
    sets = {}
    total = sum(len(v) for v in splits.values())
    with bar(total, "decoding images") as advance:
        for name, samples in splits.items():
            sets[name] = decode_split(source, samples, size, cfg.data, cfg.cache_dir, advance)
    if not len(sets["train"]):
        raise DataError(f"{source.location}: every training image was unreadable")
    labels = sets["train"].labels
    present = set(labels.nonzero()[:, 1].tolist()) if labels.dim() == 2 else set(labels.tolist())
    missing = sorted(set(range(len(source.classes))) - present)
    if missing:
        raise DataError(f"{source.location}: no readable training images for class(es) "
                        f"{', '.join(source.classes[i] for i in missing)}")
    if cfg.eval.positive_class is not None:  # a wrong name fails now, not after training
        positive_index(source.classes, cfg.eval.positive_class)
    log(f"data: {source.location}  {'labels' if source.multilabel else 'classes'} {len(source.classes)}  train {len(sets['train'])}  "
        f"val {len(sets['val'])}  test {len(sets['test'])}")
    return source, sets


def feature_parts(spec: ModelSpec, cfg: RunConfig) -> dict:
    """Everything besides the images that changes cached features."""
    return {"timm": spec.timm_name, "weights": spec.weights_id, "size": spec.image_size,
            "mean": spec.mean, "std": spec.std, "features": spec.features, "taps": spec.multi_taps,
            "pool": cfg.head.pool,
            "precision": resolve_precision(cfg.backbone.precision, pick_device(cfg.train.device).type),
            **({"grayscale": True} if cfg.data.grayscale else {}),  # absent when off: old keys hold
            **({"cut": spec.cut} if spec.cut else {})}


def split_features(model, spec: ModelSpec, cfg: RunConfig, source: Source, images: ImageSet,
                   name: str, flip: bool = False, view: int | None = None, shared: bool = True,
                   extra_parts: dict | None = None, what: str = "features") -> torch.Tensor:
    """Cached features of one split; `view` k: the k-th augmented view (cfg.train.augment). Under
    torchrun (`shared`: every rank calls this) rank 0 fills the cache and the others read it.
    `model` is anything with `features(x)`; one computing something else than the grafted model's
    pooled features (the maps below a trained top, continual/top.py) says so in `extra_parts`."""
    if shared and not is_main():
        barrier()
    augment = None
    if view is not None:
        augment = make_augment(cfg.train.augment)
        augment.reseed(cfg.train.seed * 1000 + view)
    label = f"{name}{' flipped' if flip else ''}{f' view {view}' if view is not None else ''}"
    feats, hit = cached_features(
        model, images, {**feature_parts(spec, cfg), **(extra_parts or {})}, source.fingerprint,
        cache_root(cfg.cache_dir) if cfg.train.cache_features else None,
        size=spec.image_size, mean=spec.mean, std=spec.std, batch_size=cfg.train.eval_batch_size,
        micro_batch=cfg.train.micro_batch, precision=cfg.backbone.precision,
        channels_last=cfg.backbone.channels_last, flip=flip, description=f"backbone: {label}", augment=augment,
        view=[cfg.train.augment, cfg.train.seed, view] if view is not None else None)
    log(f"{what} {label}: {tuple(feats.shape)} {'from cache' if hit else 'computed'}")
    if shared and is_main():
        barrier()
    return feats
