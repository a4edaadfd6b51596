"""Callbacks on the loop's events: learning-rate schedules, early stopping, the weight average, and
the registry through which a config names callbacks of its own.

Schedules and early stopping derive everything from the loop's State (step, history), so they
save nothing: the schedule recomputes the rate from the step, early stopping its best epoch from
the history. The weight average carries its tensors in the checkpoint (`state_dict`).

A new training method joins a run as a registered callback plus a config entry, with no edit to
the pipeline: `@register_callback("name", OptionsDataclass)` on a factory `(options) -> Callback`,
and `callbacks: {name: {option: value}}` in a run's config (saved with the run, so `--resume`
builds it again and hands it its checkpointed state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..errors import ConfigError
from ..fields import from_dict, suggest
from ..io import save_tensors
from ..registry import Registry
from ..progress import log
from .distributed import barrier, is_main
from .loop import Callback, State
from .optim import lr_factor


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

    @property
    def key(self) -> str:
        return f"EarlyStopping/{self.path.stem}"

    def after_epoch(self, state: State, row: dict) -> None:
        best = self._best(state.history)
        if best is row and is_main():
            save_tensors(self.path, self.weights(), {"epoch": str(row["epoch"])})
        elif best is not None and state.epoch - best["epoch"] >= self.patience:
            log(f"early stopping: {self.monitor} best at epoch {best['epoch']} "
                f"({best[self.monitor]:.4f}), no better for {self.patience} epochs")
            state.stop = True

    def after_fit(self, state: State) -> None:
        barrier()  # rank 0 has written the file
        best = self._best(state.history)
        if best is not None and self.path.is_file() and best["epoch"] != state.epoch:
            self.module.load_state_dict(load_file(str(self.path)))
            log(f"restored the best weights (epoch {best['epoch']}, {self.monitor} {best[self.monitor]:.4f})")


class WeightEMA(Callback):
    """An exponential moving average of the model's weights and buffers (timm's ModelEmaV3), updated
    after every optimizer step: late in training it averages away the noise of the last steps
    (timm's --model-ema). Validation runs on the average: its weights are swapped into the model
    for the pass and the trained ones put back, so training goes on from them. When the fit ends
    the average stays in the model for good (test scores and the saved model are the average's).
    Its tensors travel in the checkpoint (`state_dict`), so a resumed run continues the same
    average."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from timm.utils import ModelEmaV3
        self.model = model
        self.ema = ModelEmaV3(model, decay=decay, stochastic_rounding=False)
        self._trained: dict[str, torch.Tensor] | None = None

    def state(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def state_dict(self) -> dict:
        return self.state()

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state)

    def after_step(self, state: State) -> None:
        self.ema.update(self.model)

    def before_eval(self, state: State) -> None:
        self._trained = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.state())

    def after_eval(self, state: State) -> None:
        self.model.load_state_dict(self._trained)
        self._trained = None

    def after_fit(self, state: State) -> None:
        self.model.load_state_dict(self.state())


def schedule(optimizer, kind: str, warmup_epochs: float, epochs: int, first_epoch: int, n_batches: int,
             state: State) -> list[Callback]:
    """A stage's LR schedule over its own steps (`epochs` of `n_batches`). Its first step is derived
    from the state it starts or resumes from (epochs done and batches of the next), whatever steps
    an earlier stage took."""
    if kind == "constant" and not warmup_epochs:
        return []
    return [LRSchedule(optimizer, kind, epochs * n_batches, int(warmup_epochs * n_batches),
                       offset=state.step - state.batch_in_epoch - (state.epoch - first_epoch) * n_batches)]


# name -> (options dataclass, factory(options) -> Callback); filled by @register_callback where a
# method is defined
CALLBACKS: Registry[tuple[type, Callable]] = Registry("callback")


def register_callback(name: str, options: type):
    """Register a callback factory under `name` for `callbacks: {name: {...}}` in a config; its
    options are the fields of the dataclass `options` (typed, with their defaults, validated like
    any config section)."""
    def add(factory):
        CALLBACKS.add(name, (options, factory))
        return factory
    return add


def build_callbacks(entries: dict[str, dict]) -> list[Callback]:
    """The callbacks a config names, built from their options, in the config's order."""
    out = []
    for name, values in (entries or {}).items():
        if name not in CALLBACKS:
            near = suggest(name, CALLBACKS.names())
            raise ConfigError(f"callbacks.{name}: no callback of that name is registered"
                              + (f"; did you mean {near}?" if near else
                                 f" (registered: {', '.join(sorted(CALLBACKS)) or 'none'})"))
        options, factory = CALLBACKS.get(name)
        out.append(factory(from_dict(options, values or {}, f"callbacks.{name}")))
    return out
