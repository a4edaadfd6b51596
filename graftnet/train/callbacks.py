"""Callbacks on the loop's events: learning-rate schedules and early stopping.

Both derive everything from the loop's State (step, history), so a resumed run needs no extra state:
the schedule recomputes the rate from the step, early stopping its best epoch from the history.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import save_tensors
from ..progress import log
from .distributed import barrier, is_main
from .loop import Callback, State


def lr_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base rate at `step` (0-based): linear warmup, then constant/cosine/one-cycle."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    # one-cycle (fastai): rise from lr/25 to lr over the first 25%, then cosine down to lr/1e4
    if t < 0.25:
        return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * t / 0.25))
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (t - 0.25) / 0.75))


class LRSchedule(Callback):
    def __init__(self, optimizer, kind: str, total_steps: int, warmup_steps: int = 0, offset: int = 0):
        """`offset`: the loop's step at which this schedule starts (a second training stage)."""
        self.optimizer, self.kind, self.total, self.warmup = optimizer, kind, total_steps, warmup_steps
        self.offset = offset
        self.base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base):
            g["initial_lr"] = lr  # kept in the optimizer's state, so resume finds the base rate

    def set(self, step: int) -> None:
        f = lr_factor(self.kind, step, self.total, self.warmup)
        for g, lr in zip(self.optimizer.param_groups, self.base):
            g["lr"] = lr * f

    def after_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        self.set(state.step - self.offset)  # the rate for the step about to be taken
        return loss


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs; keep the best weights on disk
    and put them back when training ends (`restore`)."""

    def __init__(self, module: torch.nn.Module, run_dir: Path, patience: int, monitor: str = "val_acc",
                 first_epoch: int = 0, name: str = "best", weights=None):
        """`first_epoch`: epochs before it belong to an earlier stage (another module, its own best).
        `weights()`: the state dict that was validated, when it is not the module's own (an average)."""
        self.module, self.path = module, run_dir / "checkpoint" / f"{name}.safetensors"
        self.weights = weights or module.state_dict
        self.patience, self.monitor, self.first = patience, monitor, first_epoch
        self.sign = -1 if "loss" in monitor else 1

    def _best(self, history: list[dict]) -> dict | None:
        rows = [r for r in history if r.get(self.monitor) == r.get(self.monitor)  # drop NaN
                and r["epoch"] > self.first]
        return max(rows, key=lambda r: self.sign * r[self.monitor]) if rows else None

    def after_epoch(self, state: State, row: dict) -> None:
        best = self._best(state.history)
        if best is row and is_main():
            save_tensors(self.path, self.weights(), {"epoch": str(row["epoch"])})
        elif best is not None and state.epoch - best["epoch"] >= self.patience:
            log(f"early stopping: {self.monitor} best at epoch {best['epoch']} "
                f"({best[self.monitor]:.4f}), no better for {self.patience} epochs")
            state.stop = True

    def restore(self, state: State) -> None:
        barrier()  # rank 0 has written the file
        best = self._best(state.history)
        if best is not None and self.path.is_file() and best["epoch"] != state.epoch:
            self.module.load_state_dict(load_file(str(self.path)))
            log(f"restored the best weights (epoch {best['epoch']}, {self.monitor} {best[self.monitor]:.4f})")


class WeightEMA(Callback):
    """An exponential moving average of the model's weights and buffers (timm's ModelEmaV3), updated
    after every optimizer step: late in training it averages away the noise of the last steps
    (timm's --model-ema). Validation runs on the average: its weights are swapped into the model
    for the pass and the trained ones put back, so training goes on from them. `finish()` leaves the
    average in the model for good (test scores and the saved model are the average's). Its tensors
    travel in the checkpoint (`state()`, `saved`), so a resumed run continues the same average."""

    def __init__(self, model: torch.nn.Module, decay: float, saved: dict[str, torch.Tensor] | None = None):
        from timm.utils import ModelEmaV3
        self.model = model
        self.ema = ModelEmaV3(model, decay=decay, stochastic_rounding=False)
        if saved:
            self.ema.module.load_state_dict(saved)
        self._trained: dict[str, torch.Tensor] | None = None

    def state(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def after_step(self, state: State) -> None:
        self.ema.update(self.model)

    def before_eval(self, state: State) -> None:
        self._trained = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.state())

    def after_eval(self, state: State) -> None:
        self.model.load_state_dict(self._trained)
        self._trained = None

    def finish(self) -> None:
        self.model.load_state_dict(self.state())
