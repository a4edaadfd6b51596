"""`train(cfg)`: data -> grafted model -> trained head (-> fine-tuned backbone) -> evaluation.

With the backbone frozen (stage 1), images pass through it once: their pooled features are cached
and the head trains on them for every epoch. `cache_features=False` runs the backbone on every batch
instead (the slow path that Keras `fit` takes; kept for comparison and for checking equivalence).
With `finetune.epochs`, stage 2 unfreezes backbone groups and trains them with the head on images.

Everything a stage reads is one `Job` (config, run folder, data, model, loss, the run's own
callbacks); each stage is one `Stage` (optimizer, loop state, callbacks, length) handed to `fit`. A
method that changes training (a loss term, a teacher, a penalty) is a callback: passed to `train`
or named in the config's `callbacks` section, it joins both stages and resumes with its state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import config as config_mod
from ..config import RunConfig
from ..data.augment import make_augment
from ..data.images import ImageSet
from ..data.sources import Source
from ..errors import ConfigError, GraftError
from ..evaluation import finish_evaluation, validation_logits
from ..heads import make_mlp
from ..multilabel import DEFAULT_THRESHOLD, choose_thresholds
from ..model import GraftedModel, ModelSpec, build_model, init_from_run, save_model
from ..progress import log
from ..run import RunResult, create_run, read_history, run_scope, write_environment
from ..io import atomic_write_text
from . import distributed
from .balance import class_weights, epoch_order, positive_weights
from .callbacks import EarlyStopping, WeightEMA, build_callbacks, schedule
from .tracking import trackers
from .checkpoint import Checkpointer, checkpoint_epoch, checkpoint_meta, describe_position, load_checkpoint
from .distributed import Replicated, is_main, shard
from ..features import chunk_size, device_of, image_batches, pick_device, resolve_precision
from .finetune import FineTuneMode, all_groups, describe, optimizer_groups, set_trainable, unfrozen_count
from .inputs import load_data, seed_everything, split_features
from .loop import Callback, MultiLabel, State, Task, feature_batches, fit, hard_loss, predict_logits
from .optim import make_optimizer


@dataclass
class Job:
    """A run being trained: what its stages read."""
    cfg: RunConfig
    run_dir: Path
    source: Source
    sets: dict[str, ImageSet]
    model: GraftedModel
    spec: ModelSpec
    generator: torch.Generator          # shuffling (its state is checkpointed)
    task: Task                          # the run's loss and scores: cross-entropy or, multi-label, BCE
    callbacks: list[Callback] = field(default_factory=list)  # the caller's and the config's
    test: bool = True                   # score the test split at the end (a search's trials do not)

    def features(self, split: str, flip: bool = False, view: int | None = None, shared: bool = True) -> torch.Tensor:
        """Cached backbone features of one of the run's splits (see inputs.split_features)."""
        return split_features(self.model, self.spec, self.cfg, self.source, self.sets[split], split,
                              flip=flip, view=view, shared=shared)


@dataclass
class Stage:
    """One stage's fit: optimizer, loop state, callbacks, the epoch it trains up to, its batches."""
    optimizer: Any
    state: State
    callbacks: list[Callback]
    epochs: int
    batch_size: int
    augment: str = "none"


def train(cfg: RunConfig | None, resume: str | Path | None = None,
          callbacks: list[Callback] = (), test: bool = True) -> RunResult:
    """Train a run from a config, or continue the run folder `resume` from its last checkpoint.
    `callbacks` join every stage's loop besides those the config names (`callbacks:` section):
    logging, early stopping, extra loss terms. Returns the run's folder, test metrics and history.
    `test=False`: the model is saved but the test split is not scored (a search chooses among runs
    on validation alone; `graft evaluate` scores the chosen one once)."""
    distributed.init_from_env()
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise GraftError(f"{run_dir}: not a graftnet run folder (no config.yaml); nothing to resume")
        cfg = config_mod.resolve(run_dir / "config.yaml")
    # a wrong name fails before a folder exists
    callbacks = [*build_callbacks(cfg.callbacks), *trackers(cfg.track), *callbacks]
    if not resume:
        run_dir = distributed.broadcast(create_run(cfg.out, cfg.name, cfg.backbone.name, cfg, cfg.train.seed)
                                        if is_main() else None)
    with run_scope(run_dir if is_main() else None, remove=not resume):
        if resume and is_main():
            write_environment(run_dir, cfg.train.seed)
        log(f"run folder: {run_dir}" + (f" ({distributed.world()} processes)" if distributed.world() > 1 else ""))
        job = _prepare(cfg, run_dir, callbacks)
        job.test = test
        for cb in job.callbacks:
            cb.before_run(job, bool(resume))
        return _train(job, bool(resume))


def _prepare(cfg: RunConfig, run_dir: Path, callbacks: list[Callback]) -> Job:
    """Data, model and loss of a run, seeded so a resumed run rebuilds them the same way."""
    generator = seed_everything(cfg.train.seed)
    source, sets = load_data(cfg)
    skipped = [s for d in sets.values() for s in d.skipped]
    if skipped and is_main():
        atomic_write_text(run_dir / "skipped.txt", "\n".join(skipped) + "\n")
        log(f"[yellow]skipped {len(skipped)} unreadable file(s), listed in {run_dir / 'skipped.txt'}[/]")
    model, spec = build_model(cfg, source.classes, source.multilabel)
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
    return Job(cfg, run_dir, source, sets, model, spec, generator, run_task(cfg, spec, sets["train"].labels, device),
               callbacks)


def run_task(cfg: RunConfig, spec: ModelSpec, train_labels: torch.Tensor, device) -> Task:
    """The run's loss as configured: cross-entropy (class weights, label smoothing), or for a
    multi-label run binary cross-entropy (train.class_weights=balanced: positive weights)."""
    t = cfg.train
    if not spec.multilabel:
        weight = class_weights(train_labels, len(spec.classes), t.class_weights)
        return Task(hard_loss(weight.to(device) if weight is not None else None, t.label_smoothing))
    unsupported = [k for k, on in (("train.label_smoothing", t.label_smoothing), ("train.mixup", t.mixup),
                                   ("train.cutmix", t.cutmix), ("train.sampler", t.sampler != "none")) if on]
    if unsupported:  # each assumes one class per image
        raise ConfigError(f"{unsupported[0]}: assumes one class per image; this label file is multi-label "
                          "(leave it at its default)")
    weight = positive_weights(train_labels, t.class_weights)
    return MultiLabel(weight.to(device) if weight is not None else None)


def _train(job: Job, resume: bool) -> RunResult:
    t, ft = job.cfg.train, job.cfg.finetune
    done = checkpoint_epoch(job.run_dir) if resume else 0
    state, logits = State(), None
    if done < t.epochs or not ft.epochs:  # stage 1: the head on the frozen backbone
        state, logits = _frozen_stage(job, resume)
    if ft.epochs:
        logits = _finetune(job, None if resume and done >= t.epochs else state)
    if not is_main():  # rank 0 writes the model and the report
        return RunResult(job.run_dir)
    model, spec = job.model.cpu(), job.spec
    val = validation_logits(model, spec, job.cfg, job.sets["val"]) if job.test or spec.multilabel else None
    if spec.multilabel:  # each label decided where its F1 on validation is highest; saved with the model
        spec.thresholds = choose_thresholds(*val) if val is not None else [DEFAULT_THRESHOLD] * spec.num_classes
    save_model(model, spec, job.run_dir)
    history = read_history(job.run_dir)
    if not job.test:
        return RunResult(job.run_dir, {}, history)
    cards = {k: v for cb in job.callbacks for k, v in cb.report_cards(job).items()}
    metrics = finish_evaluation(job.run_dir, job.cfg, job.spec, history, logits, job.sets["test"].labels,
                                job.sets["test"], job.sets["train"], val=val, cards=cards or None)
    for cb in job.callbacks:
        cb.after_run(job, metrics)
    return RunResult(job.run_dir, metrics, history)


def _frozen_stage(job: Job, resume: bool) -> tuple[State, torch.Tensor | None]:
    """Stage 1: the head on the frozen backbone. Returns the loop state and, when no fine-tuning
    follows, the test split's logits."""
    t, model = job.cfg.train, job.model
    optimizer = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                               t.optimizer, t.lr, t.weight_decay)
    state = State()
    if resume:
        state = load_checkpoint(job.run_dir, model, optimizer, job.generator)
        log(describe_position(state, -(-len(job.sets["train"]) // t.batch_size)))
    stage = Stage(optimizer, state, [], t.epochs, t.batch_size, t.augment)
    predict = job.test and not job.cfg.finetune.epochs
    # Augmentation defeats a one-view cache: either K augmented views are cached (a random one
    # drawn per sample and epoch), or the backbone runs on every augmented batch.
    on_the_fly = t.augment != "none" and not t.cache_views
    if t.cache_features and not on_the_fly:
        return state, _fit_on_features(job, stage, predict)
    _stage_callbacks(job, stage, len(job.sets["train"]), EarlyStopping(
        model.mlp, job.run_dir, t.early_stopping, job.task.monitored(t.monitor)) if t.early_stopping else None)
    return state, _image_fit(job, FineTuneMode(model), stage, predict)


def _stage_callbacks(job: Job, stage: Stage, n_rows: int, stopper: EarlyStopping | None,
                     between: list[Callback] = (), full: bool = False) -> None:
    """The stage's callbacks in the order they act: the run's own, the LR schedule, `between`
    (unfreezing, the weight average), early stopping, then the checkpoint that saves them all."""
    t = job.cfg.train
    stage.state.run_dir = job.run_dir
    first, kind, warmup = (t.epochs, job.cfg.finetune.schedule, job.cfg.finetune.warmup_epochs) if full else \
        (0, t.schedule, t.warmup_epochs)
    stage.callbacks = [*job.callbacks, *schedule(stage.optimizer, kind, warmup, stage.epochs - first, first,
                                                 -(-n_rows // stage.batch_size), stage.state),
                       *between, *([stopper] if stopper else []),
                       Checkpointer(job.run_dir, job.model, stage.optimizer, job.generator, full=full,
                                    every_s=60 * t.checkpoint_minutes)]


def _fit_on_features(job: Job, stage: Stage, predict: bool) -> torch.Tensor | None:
    """Train the head on cached features (callbacks may add rows and per-row targets: a transfer
    set, a teacher's logits); returns the test split's logits when `predict`."""
    t = job.cfg.train
    if t.augment != "none":
        train_x = torch.stack([job.features("train", view=k) for k in range(t.cache_views)])
    else:
        train_x = job.features("train")
        if t.flip_views:
            train_x = torch.stack([train_x, job.features("train", flip=True)])
    labels, targets = job.sets["train"].labels, None
    for cb in job.callbacks:
        train_x, labels, targets = cb.feature_rows(job, train_x, labels, targets)
    val_x = job.features("val") if len(job.sets["val"]) else None
    _stage_callbacks(job, stage, len(labels), EarlyStopping(job.model.mlp, job.run_dir, t.early_stopping,
                                                            job.task.monitored(t.monitor))
                     if t.early_stopping else None)
    fit(Replicated(job.model.mlp), lambda: shard(feature_batches(train_x, labels, t.batch_size, job.generator,
                                                                 t.sampler, targets)),
        -(-len(labels) // t.batch_size),
        (lambda: feature_batches(val_x, job.sets["val"].labels, t.eval_batch_size, None)) if val_x is not None else None,
        stage.optimizer, stage.epochs, stage.state, stage.callbacks,
        resolve_precision(job.cfg.backbone.precision, device_of(job.model.mlp).type, training=True, dense=True),
        task=job.task)
    if not predict or not is_main():
        return None
    views = [False, True] if t.flip_views else [False]  # flip_views: average the mirror's logits in
    logits = [predict_logits(job.model.mlp, feature_batches(job.features("test", flip=f, shared=False),
                                                            job.sets["test"].labels, t.eval_batch_size, None))[0]
              for f in views]
    return sum(logits) / len(logits)


def _finetune(job: Job, state: State | None) -> torch.Tensor | None:
    """Stage 2: unfreeze backbone groups (all, the top N, or gradually) and train them with the head,
    earlier groups at smaller rates. `state`: the loop state after stage 1, or None to resume."""
    t, ft, model = job.cfg.train, job.cfg.finetune, job.model
    groups = all_groups(model)
    optimizer = make_optimizer(optimizer_groups(model, groups, ft.lr, ft.lr_decay, ft.weight_decay),
                               ft.optimizer, ft.lr, ft.weight_decay)
    batch_size = ft.batch_size or t.batch_size
    if state is None:  # resumed: stage 2's optimizer is in the checkpoint once a step of it was taken
        meta = checkpoint_meta(job.run_dir)
        state = load_checkpoint(job.run_dir, model, optimizer, job.generator,
                                optimizer_state=meta["epoch"] > t.epochs or meta.get("batch", 0) > 0)
        log(describe_position(state, -(-len(job.sets["train"]) // batch_size)))
    # the average starts from the weights stage 2 starts from, or goes on from the checkpoint's
    ema = WeightEMA(model, ft.ema) if ft.ema else None
    unfreezer = Unfreezer(model, groups, ft.unfreeze, t.epochs)
    unfreezer.apply(state.epoch)
    state.stage = "fine-tuning"
    for row in describe(model, groups, optimizer):
        log(f"  group {row['group']:<24} {row['params']:>9,} params  "
            f"{'trainable' if row['trainable'] else 'frozen':<9}  lr {row['lr']:.2e}")
    stopper = EarlyStopping(model, job.run_dir, t.early_stopping, job.task.monitored(t.monitor), first_epoch=t.epochs,
                            name="best-finetune", weights=ema and ema.state) if t.early_stopping else None
    stage = Stage(optimizer, state, [], t.epochs + ft.epochs, batch_size, ft.augment)
    _stage_callbacks(job, stage, len(job.sets["train"]), stopper, [unfreezer, *([ema] if ema else [])], full=True)
    log(f"fine-tuning: {ft.epochs} epoch(s), unfreeze {ft.unfreeze}, BatchNorm {ft.bn}, "
        f"augment {ft.augment}" + (f", weight average (EMA) decay {ft.ema}" if ema else ""))
    return _image_fit(job, FineTuneMode(model, ft.bn), stage, predict=job.test)


class Unfreezer(Callback):
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


def _image_fit(job: Job, module: FineTuneMode, stage: Stage, predict: bool) -> torch.Tensor | None:
    """Fit `module` (the model behind a FineTuneMode) on image batches, augmented on the fly; returns
    the test split's logits when `predict`."""
    t, spec, state = job.cfg.train, job.spec, stage.state
    augment = make_augment(stage.augment)
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
            state.epoch_rng, start = job.generator.get_state(), state.batch_in_epoch  # may fall within it
        order = epoch_order(images.labels, job.generator, t.sampler) if shuffle else range(len(images))
        out = image_batches(images, order[start * bs:], bs, spec.image_size, spec.mean, spec.std,
                            job.cfg.backbone.channels_last, augment=augment if shuffle else None,
                            pin=device_of(job.model).type == "cuda", augment_seed=t.seed * 1000 + state.epoch,
                            first_batch=start)
        return (mix(x, y) for x, y in out) if shuffle and mix else out
    sets = job.sets
    chunk = chunk_size(device_of(job.model).type, spec.image_size, t.micro_batch)
    fit(Replicated(module), lambda: shard(batches(sets["train"], True, stage.batch_size)),
        -(-len(sets["train"]) // stage.batch_size),
        (lambda: batches(sets["val"], False, t.eval_batch_size)) if len(sets["val"]) else None,
        stage.optimizer, stage.epochs, state, stage.callbacks, job.cfg.backbone.precision,
        micro_batch=chunk if t.micro_batch or not _batch_statistics(module) else 0, eval_micro_batch=chunk,
        task=job.task)
    if not predict or not is_main():
        return None
    return predict_logits(job.model, batches(sets["test"], False, t.eval_batch_size), job.cfg.backbone.precision,
                          chunk)[0]


def _batch_statistics(module: FineTuneMode) -> bool:
    """Whether BatchNorm in a trained group normalises with the batch's statistics (finetune.bn
    frozen or train): chunks of a batch would then each see their own, so train.micro_batch's
    default (0) keeps batches whole; a value set explicitly chunks them anyway."""
    mod = getattr(module, "_orig_mod", module)  # under torch.compile
    return mod.bn != "eval" and any(p.requires_grad for p in mod.model.extractor.parameters())
