"""Methods against forgetting, each a callback on the one training loop (train/loop.py), with its state
in the checkpoint like any callback's:

- `EWC` (Kirkpatrick et al. 2017) adds sum_t lambda/2 * sum_i F_t,i (theta_i - theta*_t,i)^2 in
  `after_loss`; F_t is the diagonal Fisher of task t, estimated from per-row gradients of the log
  likelihood of the true label (the empirical Fisher, as Avalanche's EWC; per row, not per batch,
  since squaring a batch's mean gradient underestimates it by the batch size). Online EWC (Schwarz
  et al. 2018) keeps one Fisher, gamma * F_old + F_new, anchored at the latest weights.
- `LwF` (Li & Hoiem 2016) distils the model as it was before the task into the old classes' outputs
  on the new task's inputs, with the same term as `graft distill` (compress/teach.py).
- `Replay` keeps a class-balanced buffer of training rows (cached features on a frozen backbone)
  and adds them to every later task's rows through the loop's `feature_rows` hook.

A method is a name in METHODS: which callbacks it joins, whether it trains by gradient steps at all
(the prototype methods do not: continual/prototype.py), and whether each task starts from scratch
on everything seen so far (joint training, the upper bound). Combinations are names joined by '+':
`ewc+replay`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from ..train.loop import Callback, State
from .tasks import ContinualSettings


class Columns(nn.Module):
    """The outputs a task trains and is scored on: the seen classes (class-incremental) or the task's
    own (task-incremental: its head). Targets are positions within `cols`."""

    def __init__(self, head: nn.Module, cols: torch.Tensor):
        super().__init__()
        self.head, self.cols = head, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)[:, self.cols]


class TaskCallback(Callback):
    """A callback that also hears when a task's training ends (`after_task`), with that task's rows."""

    def after_task(self, head: nn.Module, x: torch.Tensor, y: torch.Tensor, cols: torch.Tensor,
                   generator: torch.Generator) -> None:
        pass


def _params(head: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in head.named_parameters() if p.requires_grad}


class EWC(TaskCallback):
    def __init__(self, head: nn.Module, strength: float, gamma: float | None, samples: int):
        """`gamma` None: one penalty per task (EWC); else online EWC with that decay."""
        self.head, self.strength, self.gamma, self.samples = head, strength, gamma, samples
        self.terms: list[tuple[dict, dict]] = []   # (Fisher, anchor) per task, or one online

    key = "ewc"

    def after_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        if not self.terms or not self.strength:
            return loss
        params = _params(self.head)
        penalty = sum((fisher[n] * (params[n] - anchor[n]) ** 2).sum()
                      for fisher, anchor in self.terms for n in fisher)
        return loss + self.strength / 2 * penalty

    def after_task(self, head, x, y, cols, generator) -> None:
        if len(y) == 0:
            raise ConfigError("EWC: the task has no training rows to estimate its Fisher from")
        pick = torch.randperm(len(y), generator=generator)[:self.samples]
        position = torch.full((int(max(cols.max(), y.max())) + 1,), -1, dtype=torch.long)
        position[cols] = torch.arange(len(cols))   # a class's output among the task's outputs
        fisher = {k.removeprefix("head."): v for k, v in   # Columns' names -> the head's own
                  diagonal_fisher(Columns(head, cols), x[pick].float(), position[y[pick]]).items()}
        anchor = {n: p.detach().clone() for n, p in _params(head).items()}
        if self.gamma is None or not self.terms:
            self.terms.append((fisher, anchor))
        else:  # online: one decayed sum, anchored at the newest weights
            old = self.terms[0][0]
            self.terms = [({n: self.gamma * old[n] + fisher[n] for n in fisher}, anchor)]

    def state_dict(self) -> dict:
        return {f"{t}.{kind}.{n}": v for t, (fisher, anchor) in enumerate(self.terms)
                for kind, d in (("fisher", fisher), ("anchor", anchor)) for n, v in d.items()}

    def load_state_dict(self, state: dict) -> None:
        count = 1 + max((int(k.split(".", 1)[0]) for k in state), default=-1)
        self.terms = [({k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"{t}.fisher.")},
                       {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"{t}.anchor.")})
                      for t in range(count)]


def diagonal_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Mean over rows of the squared gradient of log p(y | x) for each parameter (torch.func: one
    vectorised backward pass per chunk, not one per row)."""
    from torch.func import functional_call, grad, vmap
    if len(y) == 0:
        raise ConfigError("EWC: a Fisher from zero samples is undefined")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    # a chunk's per-row gradients held at once: about 64M numbers (256 MB), whatever the model's size
    chunk = chunk or max(1, min(256, 64_000_000 // max(1, sum(p.numel() for p in params.values()))))
    was_training = model.training
    model.eval()  # dropout off: the Fisher of the model that is kept

    def log_lik(p, xi, target):   # target: a one-hot row (vmap cannot index by a tensor's value)
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return (F.log_softmax(out, 1)[0] * target).sum()

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(0, len(y), chunk):
        with torch.no_grad():
            width = model(x[:1]).shape[1]
        grads = vmap(grad(log_lik), in_dims=(None, 0, 0))(params, x[i:i + chunk],
                                                          F.one_hot(y[i:i + chunk], width).float())
        for n, g in grads.items():
            total[n] += (g ** 2).sum(0)
    model.train(was_training)
    return {n: t / len(y) for n, t in total.items()}


class LwF(TaskCallback):
    """The model as it was before the task teaches the old outputs on the new task's inputs: one
    softmax over all old classes (class-incremental), or one per old task's head (`per_task`)."""
    key = "lwf"

    def __init__(self, head: nn.Module, alpha: float, temperature: float, per_task: bool = False):
        self.head, self.alpha, self.temperature, self.per_task = head, alpha, temperature, per_task
        self.old: nn.Module | None = None
        self.groups: list[torch.Tensor] = []   # output columns distilled together

    def after_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        if self.old is None or not self.alpha:
            return loss
        from ..compress.teach import soft_term
        x = state.batch[0]
        with torch.no_grad():
            teacher = self.old(x)
        student = self.head(x)
        term = sum(soft_term(student[:, g], teacher[:, g], self.temperature) for g in self.groups)
        return loss + self.alpha * self.temperature ** 2 * term

    def after_task(self, head, x, y, cols, generator) -> None:
        self.old = copy.deepcopy(head).eval()
        for p in self.old.parameters():
            p.requires_grad_(False)
        # class-incremental `cols` are every output seen so far; task-incremental, the task's head
        self.groups = [*self.groups, cols] if self.per_task else [cols]

    def state_dict(self) -> dict:
        if self.old is None:
            return {}
        return {**{f"group{i}": g for i, g in enumerate(self.groups)},
                **{f"old.{k}": v for k, v in self.old.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.old = copy.deepcopy(self.head).eval()
        self.old.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("old.")})
        for p in self.old.parameters():
            p.requires_grad_(False)
        self.groups = [state[f"group{i}"] for i in range(sum(k.startswith("group") for k in state))]


class Replay(TaskCallback):
    """A class-balanced buffer of `size` rows over all classes seen: each class keeps size // classes
    rows, drawn at random from its task's rows; older classes give up rows as classes arrive."""
    key = "replay"

    def __init__(self, size: int):
        self.size = size
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def feature_rows(self, job, x, y, targets):
        if self.x is None or not len(self.y):
            return x, y, targets
        return torch.cat([x, self.x.to(x.dtype)]), torch.cat([y, self.y]), targets

    def after_task(self, head, x, y, cols, generator) -> None:
        xs = [x] if self.x is None else [self.x.to(x.dtype), x]
        ys = [y] if self.y is None else [self.y, y]
        x, y = torch.cat(xs), torch.cat(ys)
        classes = torch.unique(y)
        per = self.size // max(len(classes), 1)
        keep = [idx[torch.randperm(len(idx), generator=generator)[:per]]
                for c in classes for idx in [torch.nonzero(y == c).flatten()]]
        keep = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)
        self.x, self.y = x[keep].clone(), y[keep].clone()

    def state_dict(self) -> dict:
        return {} if self.x is None else {"x": self.x, "y": self.y}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.x, self.y = state["x"], state["y"]


@dataclass
class Method:
    name: str
    callbacks: Callable[[nn.Module, ContinualSettings], list[TaskCallback]]
    gradient: bool = True      # False: a prototype method (no optimiser, no epochs)
    cumulative: bool = False   # each task retrains from scratch on every task so far (joint)
    help: str = ""


METHODS: Registry[Method] = Registry("continual method")
for _m in (
    Method("naive", lambda h, s: [], help="sequential fine-tuning: the baseline that forgets"),
    Method("joint", lambda h, s: [], cumulative=True, help="retrain on every task so far: the upper bound"),
    Method("ewc", lambda h, s: [EWC(h, s.ewc_lambda, None, s.fisher_samples)], help="elastic weight consolidation"),
    Method("online_ewc", lambda h, s: [EWC(h, s.ewc_lambda, s.ewc_gamma, s.fisher_samples)], help="one decayed Fisher"),
    Method("lwf", lambda h, s: [LwF(h, s.lwf_alpha, s.lwf_temperature, s.scenario == "task")],
           help="learning without forgetting"),
    Method("replay", lambda h, s: [Replay(s.replay)], help="class-balanced buffer of stored rows"),
    Method("ncm", lambda h, s: [], gradient=False, help="nearest class mean on the frozen features"),
    Method("ridge", lambda h, s: [], gradient=False, help="closed-form ridge on random features (RanPAC)"),
):
    METHODS.add(_m.name, _m)


def method_parts(name: str) -> list[Method]:
    """'ewc+replay' -> its methods; one clear line for an unknown or impossible combination."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    unknown = [p for p in parts if p not in METHODS]
    if unknown or not parts:
        raise ConfigError(f"continual method {name!r}: unknown {', '.join(unknown) or 'name'}; "
                          f"choose from {', '.join(METHODS)} (combine with +, e.g. ewc+replay)")
    methods = [METHODS.get(p) for p in parts]
    if len(parts) > 1 and any(not m.gradient or m.cumulative for m in methods):
        raise ConfigError(f"continual method {name!r}: only gradient methods combine "
                          "(naive, ewc, online_ewc, lwf, replay)")
    return methods
