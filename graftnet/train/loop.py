"""One training loop for every stage, as plain functions with a few named events.

`fit` runs a stage; the loop's `State` is also the fit's context, so a callback reaches the module
being trained (`state.model`), the optimizer, the stage, the data sizes and the run folder without
being handed them one by one (fastai's `cb.learn`). Events (methods a callback may define):
`before_fit(state)` and `after_fit(state)` around the stage (early stopping puts the best weights
back, a weight average leaves itself in the model), `after_loss(state, loss) -> loss`
(distillation and EWC add terms here; state.batch holds the batch's inputs, targets, logits and
per-row targets), `after_step(state)` (pruning re-applies masks, checkpoints within an epoch),
`before_eval(state)` and `after_eval(state)` around each validation pass (a weight average swaps
itself in and out), `after_epoch(state, row)` (checkpoints, early stopping sets `state.stop`).

A callback's own state travels in the checkpoint (Lightning's `state_dict`/`load_state_dict`):
the checkpointer saves every callback's `state_dict()` under its `key`, and a resumed fit hands it
back through `load_state_dict` before `before_fit`, so a new method resumes by the same path as
the model. Batches are any iterable of (x, y), or of (x, y, targets) where targets holds a row per
image for the loss (a teacher's logits): it is split into chunks with the batch and passed as
`loss_fn(logits, y, targets)`. A run resumed from a checkpoint taken within an epoch comes with
`state.batch_in_epoch` batches of it done and their sums in `state.partial`; its batches iterable
yields only the rest.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingDiverged
from ..multilabel import bce_loss, mean_ap
from ..progress import bar, log
from .balance import epoch_order
from .distributed import sum_across
from ..features import autocast, chunks, device_of
from .optim import make_optimizer  # noqa: F401  (the loop's callers build optimizers from here too)


@dataclass
class State:
    """The loop's counters (saved in checkpoints) and the running fit's context (set by `fit`)."""
    epoch: int = 0                  # epochs completed
    step: int = 0                   # optimizer steps taken
    history: list[dict] = field(default_factory=list)
    stop: bool = False
    batch: tuple | None = field(default=None, repr=False)  # (x, y, logits, *targets) in after_loss
    stage: str | None = None        # set by a caller with several stages: each epoch's row names it,
                                    # and the curves plot marks where it changes
    batch_in_epoch: int = 0         # batches of the epoch under way that are done
    partial: dict | None = None     # their sums (loss, correct, seen, labeled, seconds) so far
    epoch_rng: torch.Tensor | None = None  # the shuffling generator's state before this epoch's
                                    # order was drawn (set by batch makers that can skip batches
                                    # done: only then can a checkpoint fall within the epoch)
    restored: dict[str, dict] = field(default_factory=dict, repr=False)  # callbacks' saved states,
                                    # from a checkpoint, handed back when their fit starts
    # the fit's context, set by fit(): what callbacks act on
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: Any = field(default=None, repr=False)
    callbacks: list = field(default_factory=list, repr=False)
    epochs: int = 0                 # the epoch this fit trains up to
    n_train: int = 0                # batches per training epoch
    run_dir: Path | None = None     # where the run is written (None: a fit outside a run folder)


class Callback:
    """Joins the loop's events. `key` names its state in checkpoints (unique within a fit)."""

    @property
    def key(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict:
        """Tensors and JSON-able values a resumed run needs; {}: nothing (derived from State)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def before_fit(self, state: State) -> None:
        pass

    def after_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_step(self, state: State) -> None:
        pass

    def before_eval(self, state: State) -> None:
        pass

    def after_eval(self, state: State) -> None:
        pass

    def after_epoch(self, state: State, row: dict) -> None:
        pass

    def after_fit(self, state: State) -> None:
        pass

    # Run-level hooks, called by the pipeline (train.pipeline) with its Job: the run's config,
    # folder, data and model.
    def before_run(self, job, resume: bool) -> None:
        """The run's data and model are ready, before its first fit (`resume`: a run going on)."""

    def feature_rows(self, job, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None):
        """A frozen stage on cached features: the training rows (features, labels, per-row targets
        or None) the head trains on; a callback may add rows (a transfer set, label -1) or targets
        (a teacher's logits, which then reach `after_loss` in state.batch)."""
        return x, y, targets

    def report_cards(self, job) -> dict[str, str]:
        """Label -> value lines for the top of the run's report."""
        return {}

    def after_run(self, job, metrics: dict) -> None:
        """The run is saved and evaluated (test metrics in `metrics`): write what the method adds."""


class Task:
    """What the head's outputs mean to the loop: the loss, the hits behind an epoch's accuracy and
    the validation scores. This one: one class per image, scored by softmax; `loss` is cross-entropy
    or any loss_fn(logits, y, *targets) a caller brings (a masked or weighted one)."""
    monitor = "val_acc"              # what early stopping and the best epoch follow
    keys = ("loss", "acc")           # the validation scores, in the history as val_<key>

    def __init__(self, loss: Callable = F.cross_entropy):
        self.loss = loss

    def monitored(self, monitor: str) -> str:
        """train.monitor as this task reads it: val_acc is the task's own score."""
        return self.monitor if monitor == "val_acc" else monitor

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """(right answers, answers counted) of a training batch."""
        hard = y.argmax(1) if y.dim() == 2 else y  # mixed (soft) targets: their main class
        known = hard >= 0  # label -1: an unlabeled image (distillation's transfer set)
        return (logits.argmax(1) == hard)[known].sum().item(), known.sum().item()

    def scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        return {"loss": F.cross_entropy(logits, labels).item(),
                "acc": (logits.argmax(1) == labels).float().mean().item()}


class MultiLabel(Task):
    """Several labels per image: a sigmoid per label and binary cross-entropy (`pos_weight`: each
    label's positives weighed up, train.class_weights=balanced). Accuracy counts each (image,
    label) decision at probability 0.5; validation adds mAP, the score early stopping follows."""
    monitor = "val_map"
    keys = ("loss", "acc", "map")

    def __init__(self, pos_weight: torch.Tensor | None = None):
        def loss(logits: torch.Tensor, y: torch.Tensor, *targets) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=pos_weight)
        super().__init__(loss)

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        right = (logits > 0) == (y > 0.5)
        return right.sum().item(), right.numel()

    def scores(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        return {"loss": bce_loss(logits, labels), "acc": ((logits > 0) == (labels > 0)).float().mean().item(),
                "map": mean_ap(logits, labels)}


def train_one_epoch(model: nn.Module, batches: Iterable, n_batches: int, optimizer, state: State,
                    callbacks: list[Callback] = (), precision: str = "fp32",
                    loss_fn: Callable = F.cross_entropy, micro_batch: int = 0, task: Task | None = None) -> dict:
    """`micro_batch` > 0: each batch goes forward and backward in chunks of at most that many
    images, gradients accumulated (each chunk's mean loss weighted by its share of the batch), then
    one optimizer step: the step of the whole batch, with a chunk's activations small enough to stay
    in a CPU's cache. Exact where nothing couples the images of a batch: BatchNorm on running
    statistics (fine-tuning's default), a loss that is a plain mean over the images (unweighted,
    label-smoothed, distillation's soft term; not a mean over the labeled images only). `task`:
    its loss replaces loss_fn, its hits count the epoch's accuracy."""
    task = task or Task(loss_fn)
    loss_fn = task.loss
    model.train()
    sums = state.partial = state.partial or {"loss": 0.0, "correct": 0, "seen": 0, "labeled": 0, "seconds": 0.0}
    t0 = time.perf_counter() - sums["seconds"]
    dev = device_of(model)
    with bar(n_batches, f"epoch {state.epoch + 1}", done=state.batch_in_epoch) as advance:
        for x, y, *targets in batches:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            targets = [t.to(dev, non_blocking=True) for t in targets]
            optimizer.zero_grad(set_to_none=True)
            parts = list(zip(*(chunks(t, micro_batch) for t in (x, y, *targets))))
            batch_loss, all_logits = 0.0, []
            for i, (xs, ys, *ts) in enumerate(parts):
                # under DDP, gradients are averaged across processes once, after the last chunk
                last = i == len(parts) - 1
                with (contextlib.nullcontext() if last else getattr(model, "no_sync", contextlib.nullcontext)()):
                    loss = _chunk_loss(model, xs, ys, ts, state, callbacks, precision, loss_fn, all_logits)
                    (loss * (len(ys) / len(y)) if len(parts) > 1 else loss).backward()
                batch_loss += loss.item() * len(ys)
            optimizer.step()
            state.step += 1
            state.batch_in_epoch += 1
            correct, counted = task.hits(torch.cat(all_logits), y)
            sums["loss"] += batch_loss
            sums["correct"] += correct
            sums["seen"] += len(y)
            sums["labeled"] += counted
            sums["seconds"] = time.perf_counter() - t0
            for cb in callbacks:  # after the sums: a checkpoint taken here holds this batch whole
                cb.after_step(state)
            advance(1, loss=sums["loss"] / sums["seen"])
    # under DDP each process saw a slice of every batch: the epoch's numbers are over all of them
    total_loss, correct, seen, labeled = sum_across([sums[k] for k in ("loss", "correct", "seen", "labeled")])
    state.batch_in_epoch, state.partial, state.epoch_rng = 0, None, None
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(labeled, 1),
            "seconds": time.perf_counter() - t0}


def _chunk_loss(model, x, y, targets: list, state: State, callbacks, precision: str, loss_fn,
                all_logits: list) -> torch.Tensor:
    """Forward one chunk; its mean loss with the callbacks' terms, checked to be finite."""
    with autocast(precision, device_of(model).type, training=True):
        logits = model(x)
    loss = loss_fn(logits.float(), y, *targets)
    state.batch = (x, y, logits, *targets)  # a teacher in the loop scores the very inputs trained on
    for cb in callbacks:
        loss = cb.after_loss(state, loss)
    state.batch = None
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"loss became {loss.item()} at step {state.step + 1} (epoch {state.epoch + 1}); "
            "training stopped, the last checkpoint is kept. Lower the learning rate or check "
            "the data", state.step + 1)
    all_logits.append(logits.detach())
    return loss


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, precision: str = "fp32",
                   micro_batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    dev = device_of(model)
    for x, y in batches:
        for xs in chunks(x.to(dev, non_blocking=True), micro_batch):
            with autocast(precision, dev.type):
                logits.append(model(xs).float().cpu())
        labels.append(y)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, batches: Iterable, precision: str = "fp32", micro_batch: int = 0,
             task: Task | None = None) -> dict:
    task = task or Task()
    logits, labels = predict_logits(model, batches, precision, micro_batch)
    if len(labels) == 0:
        return {k: math.nan for k in task.keys}
    return task.scores(logits, labels)


def fit(model: nn.Module, make_train: Callable[[], Iterable], n_batches: int,
        make_val: Callable[[], Iterable] | None, optimizer, epochs: int, state: State,
        callbacks: list[Callback] = (), precision: str = "fp32",
        loss_fn: Callable = F.cross_entropy, micro_batch: int = 0,
        eval_micro_batch: int | None = None, task: Task | None = None) -> State:
    """Train from state.epoch to `epochs`; a resumed run passes its restored state. `micro_batch`:
    images per forward and backward pass (train_one_epoch; 0: whole batches); `eval_micro_batch`
    the same for validation (default: micro_batch). Callbacks get their checkpointed state back,
    then `before_fit`; `after_fit` runs when the stage ends (also when early stopping ends it).
    `task` (default: single-label with loss_fn): the loss and the scores of each epoch's row."""
    task = task or Task(loss_fn)
    eval_micro_batch = micro_batch if eval_micro_batch is None else eval_micro_batch
    callbacks = list(callbacks)
    keys = [cb.key for cb in callbacks]
    duplicate = sorted({k for k in keys if keys.count(k) > 1})
    if duplicate:  # their states would overwrite each other in the checkpoint
        raise ValueError(f"callbacks with the same key in one fit: {duplicate}; give each its own `key`")
    state.model, state.optimizer, state.callbacks = model, optimizer, callbacks
    state.epochs, state.n_train = epochs, n_batches
    for cb in callbacks:
        if cb.key in state.restored:
            cb.load_state_dict(state.restored.pop(cb.key))
    for cb in callbacks:
        cb.before_fit(state)
    while state.epoch < epochs and not state.stop:
        train = train_one_epoch(model, make_train(), n_batches, optimizer, state, callbacks, precision,
                                micro_batch=micro_batch, task=task)
        t0 = time.perf_counter()
        for cb in callbacks:
            cb.before_eval(state)
        val = evaluate(model, make_val(), precision, eval_micro_batch, task) if make_val else \
            {k: math.nan for k in task.keys}
        for cb in callbacks:
            cb.after_eval(state)
        state.epoch += 1
        row = {"epoch": state.epoch, "train_loss": train["loss"], "train_acc": train["acc"],
               **{f"val_{k}": val[k] for k in task.keys},
               "seconds": train["seconds"] + time.perf_counter() - t0,  # before a resume too
               "lr": optimizer.param_groups[-1]["lr"],  # the head's (the last group)
               **({"stage": state.stage} if state.stage else {})}
        state.history.append(row)
        log(f"epoch {state.epoch:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
            + (f" mAP {row['val_map']:.4f}" if "val_map" in row else "") + f"  ({row['seconds']:.1f}s)")
        for cb in callbacks:
            cb.after_epoch(state, row)
    for cb in callbacks:
        cb.after_fit(state)
    return state


def feature_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None,
                    sampler: str = "none", targets: torch.Tensor | None = None):
    """Mini-batches of cached features, shuffled when a generator is given (class-balanced draws with
    sampler="balanced"). x is N x D, or V x N x D for V cached views of each image (e.g. original
    and flipped): each sample draws one view. `targets` (a row per image, e.g. a teacher's logits)
    travel with their rows: batches are then (x, y, targets)."""
    order = epoch_order(y, generator, sampler) if generator is not None else torch.arange(len(y))
    views = None
    if x.dim() == 3:
        views = torch.randint(x.shape[0], (len(y),), generator=generator) if generator is not None \
            else torch.zeros(len(y), dtype=torch.long)
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        xb = x[views[idx], idx] if views is not None else x[idx]
        yield (xb.float(), y[idx]) if targets is None else (xb.float(), y[idx], targets[idx])


def hard_loss(weight: torch.Tensor | None, label_smoothing: float) -> Callable:
    """Cross-entropy on the labels; rows labeled -1 (unlabeled images a teacher labels) are left to
    the callbacks' terms. Per-row targets travel to callbacks through state.batch, not to this."""
    def loss(logits: torch.Tensor, y: torch.Tensor, *targets) -> torch.Tensor:
        if y.dim() == 1 and bool((y < 0).any()):
            known = y >= 0
            if not known.any():
                return logits.sum() * 0
            return F.cross_entropy(logits[known], y[known], weight=weight, label_smoothing=label_smoothing)
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)
    return loss
