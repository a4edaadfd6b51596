"""A finished run loaded for compression, and the whole-network fine-tune that recovers it.

Pruning recovers with `finetune` after each step, quantization-aware training trains through it;
both read the run's own config, data and preprocessing through `Run`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import resolve
from ..data.augment import make_augment
from ..errors import GraftError
from ..model import load_model, single_label_only
from ..predictor import RunPredictor
from ..train.checkpoint import Checkpointer, load_checkpoint
from ..features import chunk_size, device_of, image_batches
from ..train.finetune import FineTuneMode
from ..train.inputs import load_data
from ..train.loop import Callback, State, fit, hard_loss
from ..train.optim import make_optimizer
from .teach import RowTargets


class Run:
    """A finished run, loaded for compression: model, spec, config, data."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        if not (self.dir / "config.yaml").is_file():
            raise GraftError(f"{self.dir}: not a graftnet run folder (no config.yaml)")
        self.model, self.spec = load_model(self.dir)
        single_label_only(self.spec, self.dir, "pruning and quantization-aware training recover and "
                          "check the model by top-1 accuracy, which needs one class per image")
        self.cfg = resolve(self.dir / "config.yaml")
        self.source, self.sets = load_data(self.cfg)

    def logits(self, model: nn.Module, split: str = "test") -> torch.Tensor:
        return RunPredictor(self.dir, model, self.spec, self.cfg).logits(
            self.sets[split], self.cfg.train.eval_batch_size, f"evaluate {split}")

    def accuracy(self, model: nn.Module, split: str = "test") -> float:
        labels = self.sets[split].labels
        return (self.logits(model, split).argmax(1) == labels).float().mean().item() if len(labels) else float("nan")

    def batches(self, split: str, batch_size: int, generator: torch.Generator | None, augment=None,
                targets: torch.Tensor | None = None):
        """(x, y) batches of a split, shuffled with a generator; with `targets` (one row per image)
        (x, y, rows of targets): they travel with the batch, through the loop's chunks, to the loss."""
        images = self.sets[split]
        order = torch.randperm(len(images), generator=generator) if generator is not None else torch.arange(len(images))
        out = image_batches(images, order, batch_size, self.spec.image_size, self.spec.mean, self.spec.std,
                            self.cfg.backbone.channels_last, augment=augment)
        for i, (x, y) in zip(range(0, len(order), batch_size), out):
            yield (x, y) if targets is None else (x, y, targets[order[i:i + batch_size]])


@dataclass
class Recovery:
    """How a compressed network trains back: every parameter, on the run's images of `split`, for
    `epochs` more epochs, BatchNorm in mode `bn` (see PruneSettings). With `teacher` (logits of the
    uncompressed model per image of the split) the loss is distillation. With `checkpoint` (a run
    folder) every epoch is checkpointed there, with the callbacks' states; `resume` first restores
    the optimizer's moments from it. Batches go forward and backward in chunks (the run's
    train.micro_batch, 0: chosen by device) where that leaves the step unchanged; `chunked=False`
    keeps them whole unless the run asks."""
    epochs: int
    lr: float
    batch_size: int
    teacher: torch.Tensor | None = None
    alpha: float = 0.0
    temperature: float = 4.0
    bn: str = "eval"
    split: str = "train"
    chunked: bool = True
    checkpoint: Path | None = None
    resume: bool = False


def finetune(run: Run, model: nn.Module, r: Recovery, state: State, callbacks: list[Callback],
             generator: torch.Generator) -> None:
    """Train `model` back as `r` says, from `state` (its epochs go on counting): the run's hard
    loss, plus the teacher's term (teach.RowTargets) when `r.teacher` holds logits per image."""
    if r.epochs <= 0:
        return
    for p in model.parameters():
        p.requires_grad_(True)
    # by name: a resumed optimizer gets each moment back by name (magnitude pruning re-registers
    # weights, which reorders a module's parameters)
    optimizer = make_optimizer(list(model.named_parameters()), run.cfg.train.optimizer, r.lr,
                               run.cfg.train.weight_decay)
    if r.resume:
        load_checkpoint(r.checkpoint, model, optimizer, generator)
    if r.checkpoint is not None:
        callbacks = [*callbacks, Checkpointer(r.checkpoint, model, optimizer, generator, full=True)]
    augment = make_augment(run.cfg.train.augment)
    n = len(run.sets[r.split])
    requested = run.cfg.train.micro_batch
    chunk = chunk_size(device_of(model).type, run.spec.image_size, requested)
    # Chunks would change the step where BatchNorm uses batch statistics, and where the loss is a
    # mean over the labeled images of a batch only (unlabeled transfer images among them).
    exact = r.chunked and r.bn == "eval" and bool((run.sets[r.split].labels >= 0).all())

    if r.teacher is not None and r.alpha > 0:  # the unpruned model's logits ride with their rows
        callbacks = [RowTargets(None, r.temperature, r.alpha), *callbacks]
    loss_fn = hard_loss(None, run.cfg.train.label_smoothing)
    val = (lambda: run.batches("val", run.cfg.train.eval_batch_size, None)) if len(run.sets["val"]) else None
    fit(FineTuneMode(model, r.bn), lambda: run.batches(r.split, r.batch_size, generator, augment, r.teacher),
        -(-n // r.batch_size), val, optimizer, state.epoch + r.epochs, state, callbacks,
        run.cfg.backbone.precision, loss_fn, micro_batch=chunk if requested or exact else 0,
        eval_micro_batch=chunk)
    model.eval()
