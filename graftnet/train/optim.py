"""Optimizers and learning-rate schedules, by name: the registries that `train.optimizer`,
`train.schedule` and their `finetune.` twins choose from.

Each optimizer entry carries the settings graftnet always uses with it (SGD: momentum 0.9, Nesterov),
so a config names the method and its rate, never these. A schedule is the shape of the rate's
multiplier over the steps after warmup, t in [0, 1]; warmup is the same linear ramp for all of them.
This module imports nothing of graftnet above the registry: the config reads its names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..registry import Registry


@dataclass(frozen=True)
class OptimizerEntry:
    cls: type[torch.optim.Optimizer]
    defaults: dict = field(default_factory=dict)   # passed on every time, besides lr and weight_decay


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")
OPTIMIZERS.add("adam", OptimizerEntry(torch.optim.Adam))
OPTIMIZERS.add("adamw", OptimizerEntry(torch.optim.AdamW))     # decoupled weight decay
OPTIMIZERS.add("sgd", OptimizerEntry(torch.optim.SGD, {"momentum": 0.9, "nesterov": True}))


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`params`: parameters, (name, parameter) pairs or param-group dicts, as torch.optim takes them."""
    entry = OPTIMIZERS.get(name)
    return entry.cls(params, lr=lr, weight_decay=weight_decay, **entry.defaults)


SCHEDULES: Registry[Callable[[float], float]] = Registry("schedule")


@SCHEDULES.register("constant")
def _constant(t: float) -> float:
    return 1.0


@SCHEDULES.register("cosine")
def _cosine(t: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * t))


@SCHEDULES.register("onecycle")
def _onecycle(t: float) -> float:
    """fastai's one-cycle: rise from lr/25 to lr over the first 25%, then cosine down to lr/1e4."""
    if t < 0.25:
        return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * t / 0.25))
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (t - 0.25) / 0.75))


def lr_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base rate at `step` (0-based): linear warmup, then the schedule's shape."""
    shape = SCHEDULES.get(kind)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:  # no steps left after warmup: stay at the base rate
        return 1.0
    return shape(min(1.0, (step - warmup) / max(1, total - warmup)))
