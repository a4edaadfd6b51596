"""Fine-tuning: parameter groups, freezing and unfreezing, BatchNorm modes, discriminative rates.

A backbone's parameters split into groups from the input up (stem, stage 1, ..., last stage), as
timm's `group_matcher` declares them (our torchvision wrappers declare theirs the same way); the new
head is one more group on top. Freezing acts on whole groups, counted from the top, and every
optimizer group carries its group's name and parameter names, so a resumed run rebuilds the optimizer
by name (Lightning's BaseFinetuning) and each group's learning rate shrinks with depth (fastai's
discriminative rates: earlier layers hold general features that need less change).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from timm.models._manipulate import group_with_matcher

from ..config import BN_MODES, parse_unfreeze
from ..errors import ConfigError

@dataclass
class Group:
    name: str
    params: list[str]         # names in the grafted model (extractor.model.blocks.0...)


def backbone_groups(model: nn.Module) -> list[Group]:
    """Groups of the backbone (model.extractor.model), in input-to-output order."""
    body = model.extractor.model
    named = [(n, p) for n, p in body.named_parameters()]
    matcher = getattr(body, "group_matcher", None)
    if matcher is None:  # no declared groups: the whole backbone is one group
        return [Group("backbone", [f"extractor.model.{n}" for n, _ in named])]
    ids = group_with_matcher(named, matcher(coarse=True), reverse=True)
    groups: dict[int, list[str]] = {}
    for n, _ in named:
        groups.setdefault(ids[n], []).append(n)
    return [Group(_group_name(names), [f"extractor.model.{n}" for n in names])
            for _, names in sorted(groups.items())]


def _group_name(names: list[str]) -> str:
    """A readable name: the shared leading modules, e.g. 'blocks.3' or 'conv_stem+bn1'."""
    heads = []
    for n in names:
        parts = n.split(".")
        head = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if head not in heads:
            heads.append(head)
    return "+".join(heads[:3]) + ("+..." if len(heads) > 3 else "")


def all_groups(model: nn.Module) -> list[Group]:
    """Backbone groups then the head (pooling + MLP), input to output."""
    head = [n for n, _ in model.named_parameters() if not n.startswith("extractor.")]
    return backbone_groups(model) + [Group("head", head)]


def unfrozen_count(strategy: str, stage_epoch: int, n_groups: int) -> int:
    """How many backbone groups, counted from the top, train during fine-tuning epoch `stage_epoch`
    (0-based). A function of the epoch alone, so a resumed run unfreezes exactly as before."""
    kind, num = parse_unfreeze(strategy)
    if kind == "all":
        return n_groups
    if kind == "top":
        return min(num, n_groups)
    return min(n_groups, 1 + stage_epoch // num)


def set_trainable(model: nn.Module, groups: list[Group], n_unfrozen: int) -> None:
    """The head and the top `n_unfrozen` backbone groups train; everything below is frozen."""
    backbone = groups[:-1]
    trainable = {n for g in backbone[len(backbone) - n_unfrozen:] for n in g.params} | set(groups[-1].params)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Backbone modules with no trainable parameter anywhere below them (their whole subtree is
    frozen), outermost first; parameterless modules follow their parent."""
    out, covered = [], []
    for name, module in model.extractor.model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(module)
            covered.append(name)
    return out


class FineTuneMode(nn.Module):
    """Wraps the grafted model so `train()` leaves frozen parts in eval mode: frozen groups run without
    dropout/drop-path and with fixed BatchNorm statistics. bn='eval' (fine-tuning's default) keeps
    every backbone BatchNorm on its running statistics, trained groups included: in train mode
    BatchNorm normalises with batch statistics, which moves the features the head was trained on
    (Keras gives the same advice). 'frozen': trained groups' BatchNorm uses batch statistics;
    'train': frozen groups' BatchNorm layers update their statistics too."""

    def __init__(self, model: nn.Module, bn: str = "frozen"):  # stage 1 passes nothing: all frozen
        super().__init__()
        if bn not in BN_MODES:
            raise ConfigError(f"finetune.bn: {bn!r} is not one of {', '.join(BN_MODES)}")
        self.model, self.bn = model, bn

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            return self
        for module in frozen_modules(self.model):
            module.eval()
            if self.bn == "train":
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
        if self.bn == "eval":
            for m in self.model.extractor.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x):
        return self.model(x)


def optimizer_groups(model: nn.Module, groups: list[Group], lr: float, decay: float,
                     weight_decay: float) -> list[dict]:
    """One optimizer group per parameter group, frozen ones included (their parameters get no
    gradient and are skipped), with lr * decay**k for the k-th group below the head."""
    params = dict(model.named_parameters())
    out = []
    for depth, g in enumerate(reversed(groups)):
        out.append({"name": g.name, "params": [(n, params[n]) for n in g.params],
                    "lr": lr * decay ** depth, "weight_decay": weight_decay})
    return out[::-1]


def describe(model: nn.Module, groups: list[Group], optimizer: torch.optim.Optimizer) -> list[dict]:
    """Per group: name, parameter count, trainable or not, learning rate (for logs and tests)."""
    params = dict(model.named_parameters())
    rows = []
    for g, og in zip(groups, optimizer.param_groups):
        rows.append({"group": g.name, "params": sum(params[n].numel() for n in g.params),
                     "trainable": any(params[n].requires_grad for n in g.params), "lr": og["lr"]})
    return rows
