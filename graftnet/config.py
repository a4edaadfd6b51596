"""Typed configuration for every stage, loaded from and saved to YAML.

A run folder always holds the resolved `config.yaml`; `graft train --config run/config.yaml`
reproduces the run. Each setting is declared once, below, with its help text and allowed values
(fields.py): the YAML keys, `--set KEY=VALUE`, the `graft train` flags with their defaults in
`--help` (options.py) and the check of allowed values all come from that declaration. Optimizers,
schedules and augmentation presets are registries; their names are the allowed values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .data.augment import AUGMENTATIONS
from .errors import ConfigError
from .fields import check_choices, from_dict, option, section, walk
from .train.optim import OPTIMIZERS, SCHEDULES

BN_MODES = ("frozen", "train", "eval")   # finetune.bn; train/finetune.py applies them


def parse_unfreeze(strategy: str) -> tuple[str, int]:
    """'all' | 'top:N' | 'gradual:E' -> (kind, number); a clear error for anything else."""
    kind, _, num = strategy.partition(":")
    if kind == "all" and not num:
        return kind, 0
    if kind in ("top", "gradual") and num.isdigit() and int(num) > 0:
        return kind, int(num)
    raise ConfigError(f"finetune.unfreeze: {strategy!r} is not 'all', 'top:N' or 'gradual:E' "
                      "(N groups from the top; one more group every E epochs)")


@dataclass
class DataConfig:
    path: str = option("cifar10", flag="data",
                       help="class folder, ZIP with class folders, CIFAR archive, or 'cifar10'; "
                            "with --labels: the folder the label file's paths are under")
    labels: str | None = option(None, metavar="CSV", help="label file (CSV) "
                                "listing the images under --data: a file column and a label column "
                                "(several labels per cell: multi-label), or one 0/1 column per label")
    label_separator: str = option("|", metavar="CHAR", help="separates the labels within a label cell")
    file_column: str | None = option(None, cli=False, help="the label file's column of image paths, "
                                     "relative to data.path (default: file, filename, image or path)")
    label_column: str | None = option(None, cli=False, help="the label file's label column (default: "
                                      "label, labels, tags or class; without one, every other column is "
                                      "a 0/1 column of its own label)")
    label_columns: str | None = option(None, cli=False, help="comma-separated 0/1 columns, one per "
                                       "label (instead of a label column)")
    split_column: str | None = option(None, cli=False, help="the label file's column naming each row's "
                                      "split: train, val or test (default: a column named split, if any)")
    val_fraction: float = option(0.1, help="share of the training split held out (stratified) to "
                                 "monitor training")
    test_fraction: float = option(0.2, cli=False, help="test share, only where the source has no "
                                  "test/ or val/ split")
    # fixed apart from train.seed: seeds vary training, not which images are tested
    split_seed: int = option(0, cli=False, help="seed of the train/val/test split")
    max_per_class: int | None = option(None, metavar="N", help="use at most N images per class and "
                                       "split (quick experiments, tests)")
    skip_bad: bool = option(False, help="skip unreadable images and list them in the run instead "
                            "of failing")
    workers: int = option(2, cli=False, help="decoding threads (or processes: decode_in)")
    # data/decoding.py: threads were faster on a 2-core CPU; processes isolate a decoder's memory
    decode_in: str = option("threads", choices=("threads", "processes"), cli=False,
                            help="decode in threads of this process or in worker processes")
    cache_decoded: bool = option(True, cli=False, help="keep decoded images in the cache folder for "
                                 "the next run")
    # data/decoded.py: auto holds them in memory where they take at most a quarter of what is free
    in_memory: str = option("auto", choices=("auto", "yes", "no"), cli=False,
                            help="decoded images in memory (yes), read from disk per batch (no), "
                            "or in memory where they fit (auto)")
    # X-rays and other scans whose colour is noise; training, evaluate and predict alike
    grayscale: bool = option(False, cli=False, help="luminance only, copied to R, G and B")


@dataclass
class BackboneConfig:
    name: str = option("efficientnet_lite0", flag="backbone",
                       help="registered name or any timm architecture (see `graft backbones`)")
    weights: str | None = option(None, metavar="FILE", help="backbone weights file (safetensors, or "
                                 ".pth read weights-only); default: the registry's source")
    pretrained: bool = option(True, flag="no-pretrained",
                              help="start from pretrained weights; --no-pretrained: random initialisation")
    image_size: int | None = option(None, metavar="PX", help="input size (default: the backbone's)")
    # timm's prune_intermediate_layers: the later blocks and the final 1x1 convolution go
    cut: int = option(0, metavar="N", help="drop the backbone's last N stages: a smaller, faster "
                      "network (small images sometimes need no more)")
    features: str = option("last", choices=("last", "multi", "blocks"),
                           help="final feature map; + pooled outputs of late stages (multi); + of "
                           "every block (blocks)")
    # auto: bf16 only where it is fast (features.native_bf16): a GPU, AMX, or AVX512-BF16 for the
    # inference pass and a head's steps on cached features (fine-tuning steps stay fp32 there); on
    # AVX2 bf16 is ~10x slower
    precision: str = option("auto", choices=("auto", "bf16", "fp32"),
                            help="backbone pass and training steps: bf16 autocast, fp32, or auto (bf16 "
                            "where it is fast)")
    channels_last: bool = option(True, cli=False, help="channels-last memory layout for the backbone")


@dataclass
class HeadConfig:
    pool: str = option("avg", choices=("avg", "flatten"),
                       help="global average pooling, or Flatten (the paper's)")
    hidden: list[int] = option(factory=lambda: [256], metavar="WIDTHS",
                               help="hidden widths, comma-separated (e.g. 256 or 512,256; '' for none)")
    activation: str = option("relu", choices=("relu", "gelu", "silu", "tanh"), cli=False,
                             help="activation after each hidden layer")
    dropout: float = option(0.5, help="dropout after each hidden layer (0: none)")


@dataclass
class TrainConfig:
    epochs: int = option(10, help="epochs on the frozen backbone (0 with --finetune-epochs: stage 2 alone)")
    batch_size: int = option(128, help="images per optimizer step")
    lr: float = option(1e-3, help="learning rate")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="optimizer")
    weight_decay: float = option(0.0, help="weight decay (with adamw: decoupled, L2 regularisation)")
    label_smoothing: float = option(0.0, help="label smoothing of the cross-entropy, in [0, 1)")
    schedule: str = option("constant", choices=SCHEDULES, help="learning-rate schedule, per step")
    warmup_epochs: float = option(0.0, help="linear learning-rate warmup before the schedule")
    early_stopping: int = option(0, metavar="PATIENCE", help="stop after PATIENCE epochs without a "
                                 "better validation score and keep the best weights (0: off)")
    monitor: str = option("val_acc", choices=("val_acc", "val_loss"), cli=False,
                          help="what early stopping watches (multi-label runs: val_acc means val_map, "
                               "the validation mAP)")
    seed: int = option(0, help="seed of initialisation, batches and augmentation")
    cache_features: bool = option(True, flag="no-cache", help="frozen backbone: run it once per image "
                                  "and train on cached features; --no-cache: run it on every batch")
    augment: str = option("none", choices=AUGMENTATIONS, help="augmentation preset ('paper': the paper's)")
    cache_views: int = option(0, metavar="K", help="with --augment: cache K augmented views per image "
                              "(0: run the backbone on freshly augmented images every batch)")
    mixup: float = option(0.0, metavar="ALPHA", help="MixUp's alpha (0: off; with --cutmix, one of the "
                          "two per batch); needs images on the fly")
    cutmix: float = option(0.0, metavar="ALPHA", help="CutMix's alpha (0: off); needs images on the fly")
    flip_views: bool = option(False, help="cache flipped images too: training draws one view per "
                              "sample, evaluation averages the logits of both")
    eval_batch_size: int = option(256, cli=False, help="images per batch when scoring")
    # On a CPU, chunks whose activations stay in cache run about 2x faster (BENCHMARKS.md, micro-batches),
    # unless BatchNorm trains on batch statistics.
    micro_batch: int = option(0, metavar="N", help="images per forward/backward pass, gradients "
                              "accumulated over the batch (0: 32, 16 or 8 by input size on a CPU, "
                              "whole batches on a GPU)")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), cli=False,
                         help="auto: the GPU when there is one")
    # off by default: compiling costs more than it saves on short runs (BENCHMARKS.md)
    compile: bool = option(False, help="torch.compile the model when it trains on images")
    class_weights: str = option("none", choices=("none", "balanced"), cli=False,
                                help="balanced: inverse class frequency in the cross-entropy "
                                     "(multi-label: each label's positives weighed by negatives / positives)")
    sampler: str = option("none", choices=("none", "balanced"), cli=False, help="balanced: draw "
                          "training samples class-balanced, with replacement")
    # so --resume loses at most this much of a long epoch
    checkpoint_minutes: float = option(10.0, metavar="M", help="training on images: also checkpoint "
                                       "every M minutes within an epoch (0: at epoch ends only)")
    # e.g. go on at a larger image size (fastai's progressive resizing)
    init: str | None = option(None, metavar="RUN", help="start from a finished run's weights (same "
                              "backbone and head); other classes: the backbone only")


@dataclass
class FinetuneConfig:
    """Stage 2 (`graft finetune`): after train.epochs on the frozen backbone, unfreeze and train on."""
    epochs: int = option(0, flag="finetune-epochs", help="epochs with unfrozen backbone groups (0: no "
                         "stage 2)")
    unfreeze: str = option("all", metavar="all|top:N|gradual:E", help="which backbone groups train: "
                           "all, the top N, or one more every E epochs from the top")
    lr: float = option(3e-4, flag="finetune-lr", help="the head's rate in stage 2; the k-th group "
                       "below it gets lr * lr_decay**k")
    lr_decay: float = option(0.5, help="each earlier group's rate = the next one's x this "
                             "(discriminative rates; 1: one rate for all)")
    optimizer: str = option("adamw", choices=OPTIMIZERS, cli=False, help="optimizer in stage 2")
    weight_decay: float = option(0.01, cli=False, help="weight decay in stage 2")
    schedule: str = option("cosine", choices=SCHEDULES, cli=False, help="schedule in stage 2")
    warmup_epochs: float = option(0.0, cli=False, help="linear warmup in stage 2")
    # eval: batch statistics would shift the features the head was trained on (BENCHMARKS.md, which groups to train and BatchNorm)
    bn: str = option("eval", choices=BN_MODES, help="BatchNorm statistics: all kept (eval), kept in "
                     "frozen groups only (frozen), all updated (train)")
    # images pass through the backbone anyway: augmentation is cheap
    augment: str = option("flip", choices=AUGMENTATIONS, flag="finetune-augment",
                          help="augmentation preset in stage 2")
    batch_size: int = option(0, cli=False, help="batch size in stage 2 (0: train.batch_size)")
    ema: float = option(0.0, metavar="DECAY", help="validate, keep and save a moving average of the "
                        "weights with this decay (e.g. 0.999; 0: off)")


@dataclass
class EvalConfig:
    """Two-class problems: which class is "positive" and how the decision threshold is chosen."""
    # name it explicitly in a recipe
    positive_class: str | None = option(None, cli=False, help="the positive class (default: the "
                                        "second in sorted order, e.g. PNEUMONIA after NORMAL)")
    threshold: str = option("youden", choices=("youden", "sensitivity"), cli=False,
                            help="youden: maximise sensitivity + specificity - 1 on the validation "
                                 "split; sensitivity: reach target_sensitivity")
    target_sensitivity: float = option(0.95, cli=False, help="with threshold=sensitivity")


TRACKERS = ("tensorboard", "mlflow")


@dataclass
class TrackConfig:
    """Where a run's parameters, per-epoch metrics, test metrics, plots and model go besides its folder."""
    log_to: str = option("none", flag="log-to", metavar="tensorboard,mlflow",
                         help="experiment tracking: tensorboard (event files in the run folder), "
                              "mlflow, or both, comma-separated (none: off)")
    mlflow_uri: str | None = option(None, flag="mlflow-uri", metavar="URI",
                                    help="MLflow tracking server (http://host:5000) or store "
                                         "(default: sqlite:///OUT/mlflow.db beside the run folders)")
    experiment: str = option("graftnet", cli=False, help="MLflow experiment the runs are logged to")

    @property
    def loggers(self) -> list[str]:
        return [t.strip() for t in self.log_to.split(",") if t.strip() and t.strip() != "none"]


@dataclass
class RunConfig:
    name: str | None = option(None, help="run folder name (default: <backbone>-<timestamp>)")
    out: str = option("runs", help="parent folder of run folders")
    cache_dir: str | None = option(None, help="feature cache (default: ~/.cache/graftnet)")
    data: DataConfig = section(DataConfig, help="data")
    backbone: BackboneConfig = section(BackboneConfig, help="backbone")
    head: HeadConfig = section(HeadConfig, help="head")
    train: TrainConfig = section(TrainConfig, help="training (stage 1: the head on the frozen backbone)")
    finetune: FinetuneConfig = section(FinetuneConfig,
                                       help="fine-tuning (stage 2, after --epochs on the frozen backbone)")
    eval: EvalConfig = section(EvalConfig, help="two-class evaluation")
    track: TrackConfig = section(TrackConfig, help="experiment tracking")
    callbacks: dict[str, dict] = option(factory=dict, cli=False,
                                        help="training methods joined as registered callbacks, "
                                             "name -> options (docs/training.md)")


KEYS = tuple(key for key, _, _ in walk(RunConfig))   # every dotted key, sections included


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (YAML config files are UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
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
    cfg = from_dict(RunConfig, data, known=KEYS)
    validate(cfg)
    return cfg


MAX_IMAGE_SIZE = 4096  # 100000 px would make the shape probe alone allocate 120 GB


def check_folder_name(name: str | None, key: str = "name") -> None:
    """A run or search folder's name is one plain folder name: `../x` or `/abs` would write outside
    --out without a word."""
    if name is None:
        return
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"{key}: {name!r} is not a plain folder name (no '/', '\\' or '..'); "
                          "--out says where run folders go")


def validate(cfg: RunConfig) -> None:
    """Allowed values come from the declarations above; ranges and combinations are checked here."""
    check_choices(cfg)
    check_folder_name(cfg.name)
    unknown = [t for t in cfg.track.loggers if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"track.log_to: {', '.join(unknown)} is not one of {', '.join(TRACKERS)} (or none)")
    for key, folder in (("out", cfg.out), ("cache_dir", cfg.cache_dir)):
        if folder and Path(folder).expanduser().exists() and not Path(folder).expanduser().is_dir():
            raise ConfigError(f"{key}: {folder} is a file, not a folder")
    if any(w <= 0 for w in cfg.head.hidden):
        raise ConfigError(f"head.hidden: widths must be positive, got {cfg.head.hidden}")
    if cfg.data.max_per_class is not None and cfg.data.max_per_class < 1:
        raise ConfigError(f"data.max_per_class: must be at least 1 (or null for all), got {cfg.data.max_per_class}")
    sep = cfg.data.label_separator
    if not sep or not sep.isprintable() or sep.strip() != sep or len(sep) > 4:
        raise ConfigError(f"data.label_separator: {sep!r} must be a short printable separator such as | or ;")
    if cfg.data.labels is not None and not cfg.data.labels.strip():
        raise ConfigError("data.labels: an empty file name (leave it out for class folders)")
    if cfg.data.workers < 1:
        raise ConfigError(f"data.workers: must be at least 1, got {cfg.data.workers}")
    if cfg.train.epochs < 0 or (cfg.train.epochs == 0 and cfg.finetune.epochs <= 0):
        raise ConfigError(f"train.epochs: must be positive, got {cfg.train.epochs} "
                          "(0 only with finetune.epochs: stage 2 alone)")
    positive = {"train.batch_size": cfg.train.batch_size, "train.lr": cfg.train.lr,
                "train.eval_batch_size": cfg.train.eval_batch_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if cfg.backbone.image_size is not None and not 16 <= cfg.backbone.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"backbone.image_size: {cfg.backbone.image_size} is out of range "
                          f"(16 to {MAX_IMAGE_SIZE} pixels)")
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
    if not isinstance(cfg.backbone.cut, int) or cfg.backbone.cut < 0:
        raise ConfigError(f"backbone.cut: a number of stages >= 0, got {cfg.backbone.cut!r}")
    if cfg.head.pool == "flatten" and cfg.backbone.features != "last":
        raise ConfigError("head.pool=flatten works on the final feature map only: use backbone.features=last")
    if not 0 < cfg.eval.target_sensitivity <= 1:
        raise ConfigError(f"eval.target_sensitivity: must be in (0, 1], got {cfg.eval.target_sensitivity}")


def save_yaml(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    """The typed config as YAML; `header` goes on top as comment lines (resolve ignores them)."""
    from .io import atomic_write_text
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, comment + yaml.safe_dump(to_dict(cfg), sort_keys=False))
