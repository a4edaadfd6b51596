"""`train(cfg)`: data -> grafted model -> trained head -> evaluation -> run folder and report.

With the backbone frozen (this stage), images pass through it once: their pooled features are cached
and the head trains on them for every epoch. `cache_features=False` runs the backbone on every batch
instead (the slow path that Keras `fit` takes; kept for comparison and for checking equivalence).
"""
from __future__ import annotations

import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as config_mod
from ..config import RunConfig
from ..data.augment import make_augment
from ..data.decoded import load_images_cached
from ..data.images import ImageSet, config_splits
from ..data.sources import Source, open_source
from ..errors import DataError, GraftError
from ..io import atomic_write_text, cache_root
from ..heads import make_mlp
from ..model import ModelSpec, build_model, init_from_run, save_model
from ..progress import bar, log, set_log_file
from ..run import new_run_dir, read_history, write_environment
from ..binary import positive_index
from .balance import class_weights, epoch_order
from .callbacks import EarlyStopping, LRSchedule, WeightEMA
from . import distributed
from .distributed import Replicated, barrier, is_main, shard
from .checkpoint import (FILE as CHECKPOINT, Checkpointer, checkpoint_epoch, checkpoint_meta, checkpoint_tensors,
                         describe_position, load_checkpoint)
from .finetune import FineTuneMode, all_groups, describe, optimizer_groups, set_trainable, unfrozen_count
from .features import cached_features, chunk_size, device_of, image_batches, pick_device, resolve_precision
from .loop import Callback, State, feature_batches, fit, make_optimizer, predict_logits


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def load_data(cfg: RunConfig) -> tuple[Source, dict[str, ImageSet]]:
    source = open_source(cfg.data.path, cfg.cache_dir)
    splits = config_splits(source, cfg.data)
    from ..backbones import get_spec
    size = cfg.backbone.image_size or get_spec(cfg.backbone.name).input_size
    sets = {}
    total = sum(len(v) for v in splits.values())
    cache = cache_root(cfg.cache_dir) if cfg.data.cache_decoded else None
    with bar(total, "decoding images") as advance:
        for name, samples in splits.items():
            sets[name] = load_images_cached(source, samples, size, cfg.data.skip_bad, cfg.data.workers,
                                            advance, cfg.data.grayscale, cache)
    if not len(sets["train"]):
        raise DataError(f"{source.location}: every training image was unreadable")
    missing = sorted(set(range(len(source.classes))) - set(sets["train"].labels.tolist()))
    if missing:
        raise DataError(f"{source.location}: no readable training images for class(es) "
                        f"{', '.join(source.classes[i] for i in missing)}")
    if cfg.eval.positive_class is not None:  # a wrong name fails now, not after training
        positive_index(source.classes, cfg.eval.positive_class)
    log(f"data: {source.location}  classes {len(source.classes)}  train {len(sets['train'])}  "
        f"val {len(sets['val'])}  test {len(sets['test'])}")
    return source, sets


def feature_parts(spec: ModelSpec, cfg: RunConfig) -> dict:
    """Everything besides the images that changes cached features."""
    return {"timm": spec.timm_name, "weights": spec.weights_id, "size": spec.image_size,
            "mean": spec.mean, "std": spec.std, "features": spec.features, "taps": spec.multi_taps,
            "pool": cfg.head.pool,
            "precision": resolve_precision(cfg.backbone.precision, pick_device(cfg.train.device).type),
            **({"grayscale": True} if cfg.data.grayscale else {})}  # absent when off: old keys hold


def split_features(model, spec: ModelSpec, cfg: RunConfig, source: Source, images: ImageSet,
                   name: str, flip: bool = False, view: int | None = None, shared: bool = True) -> torch.Tensor:
    """Cached features of one split; `view` k: the k-th augmented view (cfg.train.augment). Under
    torchrun (`shared`: every rank calls this) rank 0 fills the cache and the others read it."""
    if shared and not is_main():
        barrier()
    augment = None
    if view is not None:
        augment = make_augment(cfg.train.augment)
        augment.reseed(cfg.train.seed * 1000 + view)
    label = f"{name}{' flipped' if flip else ''}{f' view {view}' if view is not None else ''}"
    feats, hit = cached_features(
        model, images, feature_parts(spec, cfg), source.fingerprint,
        cache_root(cfg.cache_dir) if cfg.train.cache_features else None,
        size=spec.image_size, mean=spec.mean, std=spec.std, batch_size=cfg.train.eval_batch_size,
        micro_batch=cfg.train.micro_batch, precision=cfg.backbone.precision,
        channels_last=cfg.backbone.channels_last, flip=flip, description=f"backbone: {label}", augment=augment,
        view=[cfg.train.augment, cfg.train.seed, view] if view is not None else None)
    log(f"features {label}: {tuple(feats.shape)} {'from cache' if hit else 'computed'}")
    if shared and is_main():
        barrier()
    return feats


def train(cfg: RunConfig | None, resume: str | Path | None = None,
          callbacks: list[Callback] = (), cards=None, on_start=None) -> Path:
    """Train a run from a config, or continue the run folder `resume` from its last completed epoch.
    `callbacks` join the loop's events (custom logging, early stopping, extra loss terms);
    `cards(sets) -> {title: text}` adds lines to the report (e.g. a distillation's teacher);
    `on_start(run_dir)` runs once a new run folder exists (to save what a resume will need)."""
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise GraftError(f"{run_dir}: not a graftnet run folder (no config.yaml); nothing to resume")
        cfg = config_mod.resolve(run_dir / "config.yaml")
    else:
        distributed.init_from_env()
        run_dir = distributed.broadcast(new_run_dir(cfg.out, cfg.name, cfg.backbone.name)
                                        if distributed.is_main() else None)
        if distributed.is_main():
            config_mod.save_yaml(cfg, run_dir / "config.yaml")
            if on_start:
                on_start(run_dir)
    distributed.init_from_env()
    set_log_file(run_dir / "log.txt" if distributed.is_main() else None)
    try:
        return _train(cfg, run_dir, bool(resume), list(callbacks), cards)
    except GraftError:
        if not resume and not (run_dir / CHECKPOINT).exists() and distributed.is_main():
            set_log_file(None)  # nothing worth keeping: no stray folder
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        set_log_file(None)


def _train(cfg: RunConfig, run_dir: Path, resume: bool, extra: list[Callback], cards=None) -> Path:
    log(f"run folder: {run_dir}" + (f" ({distributed.world()} processes)" if distributed.world() > 1 else ""))
    if distributed.is_main():
        write_environment(run_dir, cfg.train.seed)
    generator = seed_everything(cfg.train.seed)
    source, sets = load_data(cfg)
    skipped = [s for d in sets.values() for s in d.skipped]
    if skipped and distributed.is_main():
        atomic_write_text(run_dir / "skipped.txt", "\n".join(skipped) + "\n")
        log(f"[yellow]skipped {len(skipped)} unreadable file(s), listed in {run_dir / 'skipped.txt'}[/]")
    model, spec = build_model(cfg, source.classes)
    log(f"model: {spec.backbone} ({spec.weights_id}) at {spec.image_size}px, {spec.features} features "
        f"-> {spec.feature_dim} -> head {cfg.head.hidden} -> {spec.num_classes} classes")
    # Re-seed after building: random init of the head must not depend on how the backbone was made.
    torch.manual_seed(cfg.train.seed)
    model.mlp = make_mlp(spec.feature_dim, spec.num_classes, cfg.head)
    if cfg.train.init:  # before a resume's checkpoint: a frozen backbone is not in it
        log(init_from_run(model, spec, cfg.train.init))
    device = pick_device(cfg.train.device)
    model = model.to(device, memory_format=torch.channels_last if cfg.backbone.channels_last
                     else torch.preserve_format)
    if device.type != "cpu":
        log(f"device: {device} ({torch.cuda.get_device_name(device)})")
    t, ft = cfg.train, cfg.finetune
    done = checkpoint_epoch(run_dir) if resume else 0
    weight = class_weights(sets["train"].labels, len(spec.classes), t.class_weights)
    loss_fn = partial(F.cross_entropy, label_smoothing=t.label_smoothing,
                      weight=weight.to(device) if weight is not None else None)
    state = State()
    logits = labels = None
    if done < t.epochs or not ft.epochs:  # stage 1: the head on the frozen backbone
        optimizer = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                   t.optimizer, t.lr, t.weight_decay)
        if resume:
            state = load_checkpoint(run_dir, model, optimizer, generator)
            log(describe_position(state, -(-len(sets["train"]) // t.batch_size)))
        stopper = EarlyStopping(model.mlp, run_dir, t.early_stopping, t.monitor) if t.early_stopping else None
        callbacks = list(extra) + schedule_callbacks(optimizer, t.schedule, t.warmup_epochs, t.epochs, 0,
                                            len(sets["train"]), t.batch_size, state)
        callbacks += [stopper] if stopper else []
        callbacks.append(Checkpointer(run_dir, model, optimizer, generator, every_s=60 * t.checkpoint_minutes))
        # Augmentation defeats a one-view cache: either K augmented views are cached (a random one
        # drawn per sample and epoch), or the backbone runs on every augmented batch.
        on_the_fly = t.augment != "none" and not t.cache_views
        run = _fit_on_features if t.cache_features and not on_the_fly else _fit_on_images
        logits, labels = run(model, spec, cfg, source, sets, optimizer, state, callbacks, loss_fn,
                             generator, stopper, predict=not ft.epochs)
    if ft.epochs:
        logits, labels = _finetune(model, spec, cfg, run_dir, sets, extra, loss_fn, generator,
                                   None if resume and done >= t.epochs else state)
    if not distributed.is_main():  # rank 0 writes the model and the report
        return run_dir
    save_model(model.cpu(), spec, run_dir)
    from ..evaluation import finish_evaluation, validation_logits
    finish_evaluation(run_dir, cfg, spec, read_history(run_dir), logits, labels, sets["test"], sets["train"],
                      val=validation_logits(model, spec, cfg, sets["val"]), cards=cards(sets) if cards else None)
    return run_dir


def schedule_callbacks(optimizer, kind: str, warmup_epochs: float, epochs: int, first_epoch: int, n: int,
              batch_size: int, state: State) -> list[Callback]:
    """The stage's LR schedule over its own steps. Its first step is derived from the state it
    starts or resumes from (epochs done and batches of the next), whatever steps an earlier stage took."""
    n_batches = -(-n // batch_size)
    if kind == "constant" and not warmup_epochs:
        return []
    return [LRSchedule(optimizer, kind, epochs * n_batches, int(warmup_epochs * n_batches),
                       offset=state.step - state.batch_in_epoch - (state.epoch - first_epoch) * n_batches)]


def _finetune(model, spec, cfg, run_dir, sets, extra, loss_fn, generator, state: State | None):
    """Stage 2: unfreeze backbone groups (all, the top N, or gradually) and train them with the head,
    earlier groups at smaller rates. `state`: the loop state after stage 1, or None to resume."""
    t, ft = cfg.train, cfg.finetune
    groups = all_groups(model)
    optimizer = make_optimizer(optimizer_groups(model, groups, ft.lr, ft.lr_decay, ft.weight_decay),
                               ft.optimizer, ft.lr, ft.weight_decay)
    resumed = state is None
    if resumed:  # stage 2's optimizer is in the checkpoint once a step of it was taken
        meta = checkpoint_meta(run_dir)
        state = load_checkpoint(run_dir, model, optimizer, generator,
                                optimizer_state=meta["epoch"] > t.epochs or meta.get("batch", 0) > 0)
        log(describe_position(state, -(-len(sets["train"]) // (ft.batch_size or t.batch_size))))
    # the average starts from the weights stage 2 starts from, or goes on from the checkpoint's
    ema = WeightEMA(model, ft.ema, checkpoint_tensors(run_dir) if resumed else None) if ft.ema else None
    unfreezer = _Unfreezer(model, groups, ft.unfreeze, t.epochs)
    unfreezer.apply(state.epoch)
    module = FineTuneMode(model, ft.bn)
    state.stage = "fine-tuning"
    for row in describe(model, groups, optimizer):
        log(f"  group {row['group']:<24} {row['params']:>9,} params  "
            f"{'trainable' if row['trainable'] else 'frozen':<9}  lr {row['lr']:.2e}")
    stopper = EarlyStopping(model, run_dir, t.early_stopping, t.monitor, first_epoch=t.epochs,
                            name="best-finetune", weights=ema and ema.state) if t.early_stopping else None
    callbacks = list(extra) + schedule_callbacks(optimizer, ft.schedule, ft.warmup_epochs, ft.epochs, t.epochs,
                                        len(sets["train"]), ft.batch_size or t.batch_size, state)
    callbacks += [unfreezer] + ([ema] if ema else []) + ([stopper] if stopper else [])
    callbacks.append(Checkpointer(run_dir, model, optimizer, generator, full=True, tensors=ema and ema.state,
                                  every_s=60 * t.checkpoint_minutes))
    log(f"fine-tuning: {ft.epochs} epoch(s), unfreeze {ft.unfreeze}, BatchNorm {ft.bn}, "
        f"augment {ft.augment}" + (f", weight average (EMA) decay {ft.ema}" if ema else ""))
    return _image_fit(module, model, spec, cfg, sets, optimizer, state, callbacks, loss_fn, generator,
                      stopper, t.epochs + ft.epochs, ft.augment, ft.batch_size or t.batch_size, ema=ema)


class _Unfreezer(Callback):
    """Sets which backbone groups train for the coming epoch; a function of the epoch alone."""

    def __init__(self, model, groups, strategy: str, first_epoch: int):
        self.model, self.groups, self.strategy, self.first = model, groups, strategy, first_epoch
        self.count = -1

    def apply(self, epoch: int) -> None:
        count = unfrozen_count(self.strategy, epoch - self.first, len(self.groups) - 1)
        if count != self.count:
            set_trainable(self.model, self.groups, count)
            names = [g.name for g in self.groups[-1 - count:-1]] if count else []
            log(f"unfrozen backbone groups: {count}/{len(self.groups) - 1} ({', '.join(names) or 'none'})")
            self.count = count

    def after_epoch(self, state: State, row: dict) -> None:
        self.apply(state.epoch)


def _fit_on_features(model, spec, cfg, source, sets, optimizer, state, callbacks, loss_fn, generator,
                     stopper, predict: bool = True):
    """Train the head on cached features; returns the test split's logits and labels (None, None
    when `predict` is False: a fine-tuning stage follows)."""
    t = cfg.train
    if t.augment != "none":
        train_x = torch.stack([split_features(model, spec, cfg, source, sets["train"], "train", view=k)
                               for k in range(t.cache_views)])
    else:
        train_x = split_features(model, spec, cfg, source, sets["train"], "train")
        if t.flip_views:
            train_x = torch.stack([train_x, split_features(model, spec, cfg, source, sets["train"],
                                                           "train", flip=True)])
    val_x = split_features(model, spec, cfg, source, sets["val"], "val") if len(sets["val"]) else None
    fit(Replicated(model.mlp), lambda: shard(feature_batches(train_x, sets["train"].labels, t.batch_size,
                                                             generator, t.sampler)),
        -(-len(sets["train"]) // t.batch_size),
        (lambda: feature_batches(val_x, sets["val"].labels, t.eval_batch_size, None)) if val_x is not None else None,
        optimizer, t.epochs, state, callbacks, loss_fn=loss_fn)
    if stopper:
        stopper.restore(state)
    if not predict or not is_main():
        return None, None
    views = [False, True] if t.flip_views else [False]  # flip_views: average the mirror's logits in
    logits = [predict_logits(model.mlp, feature_batches(split_features(model, spec, cfg, source, sets["test"],
                                                                       "test", flip=f, shared=False),
                                                        sets["test"].labels, t.eval_batch_size, None))[0]
              for f in views]
    return sum(logits) / len(logits), sets["test"].labels


def _fit_on_images(model, spec, cfg, source, sets, optimizer, state, callbacks, loss_fn, generator,
                   stopper, predict: bool = True):
    """Run the frozen backbone on every batch (augmented on the fly); returns test logits, labels."""
    t = cfg.train
    return _image_fit(FineTuneMode(model), model, spec, cfg, sets, optimizer, state, callbacks, loss_fn,
                      generator, stopper, t.epochs, t.augment, t.batch_size, predict)


def _image_fit(module, model, spec, cfg, sets, optimizer, state, callbacks, loss_fn, generator, stopper,
               epochs: int, augment_name: str, batch_size: int, predict: bool = True, ema=None):
    """Fit `module` (the model behind a FineTuneMode) on image batches, augmented on the fly; with
    `ema` (a WeightEMA among the callbacks) the model ends with the average's weights."""
    t = cfg.train
    augment = make_augment(augment_name)
    mix = None
    if t.mixup or t.cutmix:  # soft targets: cross-entropy takes class probabilities as they are
        from torchvision.transforms import v2
        n = len(spec.classes)
        mix = v2.RandomChoice([m for m in (t.mixup and v2.MixUp(alpha=t.mixup, num_classes=n),
                                           t.cutmix and v2.CutMix(alpha=t.cutmix, num_classes=n)) if m])

    if t.compile:  # compiles on the first batch (a minute on CPU) and again when groups unfreeze
        module = torch.compile(module)

    def batches(images, shuffle, bs):
        start = 0
        if shuffle:  # where the order comes from and how far a resumed epoch got: a checkpoint
            state.epoch_rng, start = generator.get_state(), state.batch_in_epoch  # may fall within it
        order = epoch_order(images.labels, generator, t.sampler) if shuffle else range(len(images))
        out = image_batches(images, order[start * bs:], bs, spec.image_size, spec.mean, spec.std,
                            cfg.backbone.channels_last, augment=augment if shuffle else None,
                            pin=device_of(model).type == "cuda", augment_seed=t.seed * 1000 + state.epoch,
                            first_batch=start)
        return (mix(x, y) for x, y in out) if shuffle and mix else out
    chunk = chunk_size(device_of(model).type, spec.image_size, t.micro_batch)
    fit(Replicated(module), lambda: shard(batches(sets["train"], True, batch_size)),
        -(-len(sets["train"]) // batch_size),
        (lambda: batches(sets["val"], False, t.eval_batch_size)) if len(sets["val"]) else None,
        optimizer, epochs, state, callbacks, cfg.backbone.precision, loss_fn,
        micro_batch=chunk if t.micro_batch or not _batch_statistics(module) else 0, eval_micro_batch=chunk)
    if ema:
        ema.finish()
    if stopper:
        stopper.restore(state)
    if not predict or not is_main():
        return None, None
    return predict_logits(model, batches(sets["test"], False, t.eval_batch_size), cfg.backbone.precision, chunk)


def _batch_statistics(module: FineTuneMode) -> bool:
    """Whether BatchNorm in a trained group normalises with the batch's statistics (finetune.bn
    frozen or train): chunks of a batch would then each see their own, so train.micro_batch's
    default (0) keeps batches whole; a value set explicitly chunks them anyway."""
    return module.bn != "eval" and any(p.requires_grad for p in module.model.extractor.parameters())
