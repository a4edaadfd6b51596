"""Fine-tuning the top of the backbone task after task, at the cost of the top alone.

With the top N parameter groups training (`top_groups`, as `finetune.unfreeze: top:N` counts them:
EfficientNet's conv_head + bn2 is one group, each stage of `blocks` one more), everything below
them is frozen, so the map that enters the first trained module is the same for an image in every
epoch and every task: it is computed once (one backbone pass, kept in the feature cache like pooled
features) and each training step runs only the top. For Lite0 at 128 px with the top 2 groups
(blocks.6 + conv_head) that map is 192 x 4 x 4 per image, and a step costs a few percent of a
whole backbone's. BatchNorm keeps its running statistics (finetune.bn 'eval'): the statistics of a
task would otherwise drift with it, which is forgetting of its own.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from ..heads import GraftedModel


def _body(model: GraftedModel) -> nn.Module:
    body = model.extractor.model
    if not all(hasattr(body, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        raise ConfigError(f"top_groups: {type(body).__name__} is not an EfficientNet-style backbone (conv_stem, "
                          "blocks, conv_head); train its top on images with `graft finetune --unfreeze top:N`")
    return body


def _top_modules(model: GraftedModel, groups: int) -> tuple[list[nn.Module], nn.Module]:
    """(the trained modules in order, the module whose input is cached)."""
    body = _body(model)
    stages = len(body.blocks)
    if not 1 <= groups <= stages + 1:
        raise ConfigError(f"top_groups {groups}: {type(body).__name__} has {stages + 1} groups above its stem "
                          f"(its {stages} block stages and conv_head); choose 1 to {stages + 1}")
    blocks = list(body.blocks)[stages - (groups - 1):]
    return [*blocks, body.conv_head, body.bn2], (blocks[0] if blocks else body.conv_head)


class _Reached(Exception):
    """Raised by the hook on the first trained module: the pass stops there, the top never runs."""


class MapsBelow(nn.Module):
    """`features(x)`: the map entering the first trained module (what compute_features caches)."""

    def __init__(self, model: GraftedModel, groups: int):
        super().__init__()
        self.model = model
        self.first = _top_modules(model, groups)[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        def stop(module, inputs):
            raise _Reached(inputs[0])
        hook = self.first.register_forward_pre_hook(stop)
        try:
            self.model.extractor.model.forward_features(x)
        except _Reached as reached:
            return reached.args[0].contiguous()   # safetensors stores row-major tensors only
        finally:
            hook.remove()
        raise RuntimeError("the backbone's forward never reached its top groups")


class Top(nn.Module):
    """Cached maps -> the top groups (copies of the stock modules) -> average pooling -> the head."""

    def __init__(self, model: GraftedModel, groups: int, mlp: nn.Module):
        super().__init__()
        self.groups = groups
        self.body = nn.Sequential(*copy.deepcopy(_top_modules(model, groups)[0]))
        for p in self.body.parameters():   # the copies of frozen modules: these train
            p.requires_grad_(True)
        self.mlp = mlp

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.body(maps.float()).mean((2, 3)))

    def train(self, mode: bool = True) -> "Top":
        super().train(mode)
        for m in self.body.modules():   # running statistics stay as the backbone learned them
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def into(self, model: GraftedModel) -> GraftedModel:
        """A copy of `model` with this top's weights in its backbone and this head as its MLP."""
        out = copy.deepcopy(model)
        for mine, theirs in zip(self.body, _top_modules(out, self.groups)[0]):
            theirs.load_state_dict(mine.state_dict())
        out.mlp = self.mlp
        return out
