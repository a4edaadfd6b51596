"""Typed configuration for every stage, loaded from and saved to YAML.

A run folder always holds the resolved `config.yaml`; `graft train --config run/config.yaml`
reproduces the run. Dotted overrides (`train.lr=3e-4`) and CLI flags land on the same fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .data.augment import PRESETS
from .errors import ConfigError
from .train.finetune import BN_MODES, parse_unfreeze


@dataclass
class DataConfig:
    path: str = "cifar10"            # class folder, ZIP with class folders, CIFAR archive, or "cifar10"
    val_fraction: float = 0.1        # carved out of the training split, stratified, for monitoring
    test_fraction: float = 0.2       # only used when the source has no test/ or val/ split
    split_seed: int = 0              # fixed apart from train.seed: seeds vary training, not the split
    max_per_class: int | None = None  # take a slice (quick experiments, tests)
    skip_bad: bool = False           # skip unreadable images and list them instead of failing
    workers: int = 2                 # decoding threads
    cache_decoded: bool = True       # keep decoded images in the cache folder for the next run
    grayscale: bool = False          # luminance only, copied to R, G and B (X-rays and other scans
                                     # whose colour is noise); training, evaluate and predict alike


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    weights: str | None = None       # a file (safetensors or .pth); None: the registry's default source
    pretrained: bool = True          # False: random initialisation
    image_size: int | None = None    # None: the entry's default input size
    features: str = "last"           # "last": final feature map; "multi": + pooled outputs of late stages
    precision: str = "auto"          # backbone pass: bf16 autocast, fp32, or auto (bf16 only where the
                                     # CPU has native bf16 matmul, e.g. AMX; on AVX2 bf16 is ~10x slower)
    channels_last: bool = True


@dataclass
class HeadConfig:
    pool: str = "avg"                # "avg": global average pooling; "flatten": the paper's Flatten
    hidden: list[int] = field(default_factory=lambda: [256])
    activation: str = "relu"
    dropout: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"          # adam | adamw | sgd
    weight_decay: float = 0.0        # with adamw: decoupled weight decay (L2 regularisation)
    label_smoothing: float = 0.0
    schedule: str = "constant"       # constant | cosine | onecycle, per step
    warmup_epochs: float = 0.0       # linear warmup before the schedule
    early_stopping: int = 0          # patience in epochs (0: off); the best weights are restored
    monitor: str = "val_acc"         # val_acc | val_loss, for early stopping
    seed: int = 0
    cache_features: bool = True      # frozen backbone: run it once per image and train on its features
    augment: str = "none"            # none | flip | paper | rrc | randaugment | trivialaugment
    cache_views: int = 0             # with augment: K augmented views cached per image (0: every
                                     # batch runs the backbone on freshly augmented images)
    mixup: float = 0.0               # alpha of MixUp (0: off); with cutmix, one of the two per batch
    cutmix: float = 0.0              # alpha of CutMix (0: off); both need images: no cached views
    flip_views: bool = False         # cache flipped images too: training draws one view per sample,
                                     # evaluation averages the logits of both
    eval_batch_size: int = 256
    micro_batch: int = 0             # images per forward/backward pass: a larger batch is split and its
                                     # gradients accumulated, the same step. 0: on a CPU chunks of 32
                                     # (up to 128 px), 16 (to 160 px) or 8, whose activations stay in
                                     # cache (about 2x faster here, BENCHMARKS.md section 7), unless
                                     # BatchNorm trains on batch statistics; on a GPU whole batches
    device: str = "auto"             # auto (the GPU when there is one) | cpu | cuda
    compile: bool = False            # torch.compile the model when it trains on images (fine-tuning,
                                     # on-the-fly augmentation); off by default: see BENCHMARKS.md
    class_weights: str = "none"      # none | balanced: inverse class frequency in the cross-entropy
    sampler: str = "none"            # none | balanced: draw training samples class-balanced (with
                                     # replacement), so every class is seen equally often per epoch
    checkpoint_minutes: float = 10.0  # also checkpoint this often within an epoch when training on
                                     # images (fine-tuning, on-the-fly augmentation), so --resume loses
                                     # at most this much of a long epoch (0: at epoch ends only)
    init: str | None = None          # a finished run folder whose weights this run starts from
                                     # (same backbone and head; e.g. go on at a larger image size,
                                     # fastai's progressive resizing); other classes: backbone only


@dataclass
class FinetuneConfig:
    """Stage 2 (`graft finetune`): after train.epochs on the frozen backbone, unfreeze and train on."""
    epochs: int = 0                  # 0: no fine-tuning stage
    unfreeze: str = "all"            # all | top:N (top N backbone groups) | gradual:E (one more
                                     # group every E epochs, from the top)
    lr: float = 3e-4                 # the head's rate; the k-th group below it gets lr * lr_decay**k
    lr_decay: float = 0.5            # discriminative rates (1: one rate for all)
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    bn: str = "eval"                 # eval: every BatchNorm keeps its ImageNet statistics, trained
                                     # groups included (batch statistics would shift the features the
                                     # head was trained on; BENCHMARKS.md section 7); frozen: only
                                     # frozen groups keep them; train: all update them
    augment: str = "flip"            # images pass through the backbone anyway: augmentation is cheap
    batch_size: int = 0              # 0: train.batch_size
    ema: float = 0.0                 # decay of a moving average of the weights (e.g. 0.999); it is
                                     # validated, kept by early stopping and saved. 0: off


@dataclass
class EvalConfig:
    """Two-class problems: which class is "positive" and how the decision threshold is chosen."""
    positive_class: str | None = None   # None: the second class in sorted order (e.g. PNEUMONIA
                                        # after NORMAL); name it explicitly in a recipe
    threshold: str = "youden"           # youden: maximise sensitivity + specificity - 1 on the
                                        # validation split; sensitivity: reach target_sensitivity
    target_sensitivity: float = 0.95


@dataclass
class RunConfig:
    name: str | None = None          # run folder name; default: <backbone>-<timestamp>
    out: str = "runs"
    cache_dir: str | None = None     # feature cache; default ~/.cache/graftnet
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with an error that names the key."""
    text = str(typ)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where}: a value is required")
    try:
        if typ is bool or text.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if "list[int]" in text:
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            return [int(v) for v in value]
        if typ is int or text.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float or text.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot use {value!r} as {text}") from None


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    data = dict(data or {})
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data.pop(f.name)
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{f.name}: expected a mapping, got {value!r}")
            kwargs[f.name] = from_dict(sub, value, f"{where}.{f.name}")
        else:
            kwargs[f.name] = _coerce(value, sub, f"{where}.{f.name}")
    if data:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{where}: unknown key(s) {sorted(data)}; known keys: {known}")
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (`train.lr`) in a nested dict; values of None are ignored (flag not given)."""
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[last] = value
    return data


def resolve(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    data = load_yaml(config_file) if config_file else {}
    apply_overrides(data, overrides or {})
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    choices = {
        "head.pool": (cfg.head.pool, ("avg", "flatten")),
        "head.activation": (cfg.head.activation, ("relu", "gelu", "silu", "tanh")),
        "backbone.precision": (cfg.backbone.precision, ("auto", "bf16", "fp32")),
        "backbone.features": (cfg.backbone.features, ("last", "multi")),
        "train.optimizer": (cfg.train.optimizer, ("adam", "adamw", "sgd")),
        "train.schedule": (cfg.train.schedule, ("constant", "cosine", "onecycle")),
        "train.monitor": (cfg.train.monitor, ("val_acc", "val_loss")),
        "train.augment": (cfg.train.augment, PRESETS),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "finetune.optimizer": (cfg.finetune.optimizer, ("adam", "adamw", "sgd")),
        "finetune.schedule": (cfg.finetune.schedule, ("constant", "cosine", "onecycle")),
        "finetune.bn": (cfg.finetune.bn, BN_MODES),
        "finetune.augment": (cfg.finetune.augment, PRESETS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if cfg.train.epochs < 0 or (cfg.train.epochs == 0 and cfg.finetune.epochs <= 0):
        raise ConfigError(f"train.epochs: must be positive, got {cfg.train.epochs} "
                          "(0 only with finetune.epochs: stage 2 alone)")
    positive = {"train.batch_size": cfg.train.batch_size, "train.lr": cfg.train.lr,
                "train.eval_batch_size": cfg.train.eval_batch_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if cfg.backbone.image_size is not None and cfg.backbone.image_size < 16:
        raise ConfigError(f"backbone.image_size: {cfg.backbone.image_size} is too small (minimum 16)")
    if not 0 <= cfg.train.label_smoothing < 1 or cfg.train.warmup_epochs < 0 or cfg.train.early_stopping < 0:
        raise ConfigError("train.label_smoothing must be in [0, 1); warmup_epochs and early_stopping >= 0")
    if cfg.train.cache_views < 0 or (cfg.train.cache_views and cfg.train.augment == "none"):
        raise ConfigError("train.cache_views needs train.augment (a preset) and must be >= 0")
    if cfg.train.mixup < 0 or cfg.train.cutmix < 0:
        raise ConfigError("train.mixup and train.cutmix are Beta alphas: >= 0")
    if (cfg.train.mixup or cfg.train.cutmix) and (cfg.train.cache_views or cfg.train.flip_views
                                                  or (cfg.train.augment == "none" and cfg.train.cache_features)):
        raise ConfigError("train.mixup/cutmix mix images batch by batch: use them with an augmentation "
                          "preset on the fly (train.augment, no cache_views/flip_views) or cache_features=false")
    if cfg.train.augment != "none" and cfg.train.flip_views:
        raise ConfigError("train.flip_views and train.augment both make training views: pick one")
    if not 0 <= cfg.head.dropout < 1:
        raise ConfigError(f"head.dropout: must be in [0, 1), got {cfg.head.dropout}")
    if not 0 <= cfg.data.val_fraction < 1 or not 0 < cfg.data.test_fraction < 1:
        raise ConfigError("data.val_fraction must be in [0, 1) and data.test_fraction in (0, 1)")
    ft = cfg.finetune
    if ft.epochs < 0 or ft.lr <= 0 or not 0 < ft.lr_decay <= 1 or ft.batch_size < 0 or ft.warmup_epochs < 0:
        raise ConfigError("finetune: epochs and batch_size must be >= 0, lr > 0, lr_decay in (0, 1], "
                          "warmup_epochs >= 0")
    if cfg.train.micro_batch < 0:
        raise ConfigError(f"train.micro_batch: must be >= 0 (0: chosen by device), got {cfg.train.micro_batch}")
    if not cfg.train.checkpoint_minutes >= 0:
        raise ConfigError(f"train.checkpoint_minutes: must be >= 0 (0: at epoch ends only), "
                          f"got {cfg.train.checkpoint_minutes}")
    if not 0 <= ft.ema < 1:
        raise ConfigError(f"finetune.ema: the average's decay must be in [0, 1) (0: off), got {ft.ema}")
    parse_unfreeze(ft.unfreeze)
    if cfg.head.pool == "flatten" and cfg.backbone.features == "multi":
        raise ConfigError("head.pool=flatten works on the final feature map only: use backbone.features=last")
    for key, value in {"train.class_weights": cfg.train.class_weights, "train.sampler": cfg.train.sampler}.items():
        if value not in ("none", "balanced"):
            raise ConfigError(f"{key}: {value!r} is not one of none, balanced")
    if cfg.eval.threshold not in ("youden", "sensitivity"):
        raise ConfigError(f"eval.threshold: {cfg.eval.threshold!r} is not one of youden, sensitivity")
    if not 0 < cfg.eval.target_sensitivity <= 1:
        raise ConfigError(f"eval.target_sensitivity: must be in (0, 1], got {cfg.eval.target_sensitivity}")


def save_yaml(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    """The typed config as YAML; `header` goes on top as comment lines (resolve ignores them)."""
    from .io import atomic_write_text
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, comment + yaml.safe_dump(to_dict(cfg), sort_keys=False))
