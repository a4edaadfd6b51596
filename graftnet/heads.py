"""The grafted model: a backbone that emits feature maps and a new head that classifies them.

The head is split in two on purpose: `pool` turns feature maps into one vector (global average
pooling, or the paper's Flatten) and `mlp` classifies that vector. A frozen backbone's pooled
vectors can then be cached on disk and the MLP trained on them alone.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .config import HeadConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class FeatureExtractor(nn.Module):
    """Wraps a timm model (classifier removed): returns [final map, *late stage maps].

    With features="multi", forward hooks collect the outputs of the last `taps` stages that timm's
    `feature_info` names (for EfficientNet-Lite0: 40, 112 and 320 channels beside the final 1280).
    Features from several depths carry more of what a frozen backbone knows about small images.
    With features="blocks", every block of every stage is tapped (Lite0: 16 blocks, 1,808 pooled
    channels beside the final 1,280): Head2Toe's finding that a head reading all depths of a frozen
    network closes much of the gap to fine-tuning, at the cost of one pass.
    """

    def __init__(self, model: nn.Module, features: str = "last", taps: int = 3):
        super().__init__()
        self.model = model
        self.tap_names: list[str] = []
        modules = dict(model.named_modules())
        if features == "multi":
            info = [i for i in getattr(model, "feature_info", None) or [] if i["module"] in modules]
            # The last stage is often the final map itself (ResNet's layer4); EfficientNet adds a
            # 1x1 conv head after it, so there the last stage is a tap of its own.
            if info and info[-1]["num_chs"] == model.num_features:
                info = info[:-1]
            self.tap_names = [i["module"] for i in info[-taps:]]
        elif features == "blocks":
            self.tap_names = block_names(model)
        # A plain list, not registered submodules: a deep copy maps it onto the copy's own modules,
        # and forward need not walk the module tree on every batch.
        self._tapped = [modules[name] for name in self.tap_names]
        self._hooks = [module.register_forward_hook(_keep_output) for module in self._tapped]

    def remove_hooks(self) -> None:
        """Untap the modules: for an extractor made only for a while over another one's backbone."""
        for hook in self._hooks:
            hook.remove()
        for module in self._tapped:
            module.__dict__.pop("_graft_tap", None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        final = self.model.forward_features(x)
        return [final] + [m.__dict__.pop("_graft_tap") for m in self._tapped]

    @contextmanager
    def blocks_superset(self, image_size: int):
        """(an extractor of the same backbone with features="blocks", the column of each of this one's
        average-pooled features within its features), or None where they are not a subset. The pooled
        mean of a map does not depend on what else is tapped, so every feature mode of one backbone and
        size can be read from one cached "blocks" pass: a search over feature modes runs the backbone once."""
        full = FeatureExtractor(self.model, "blocks")
        try:
            # a stage's output is its last block's: "multi" taps stages, "blocks" taps blocks
            modules = dict(self.model.named_modules())
            mine = [_last_block(name, modules) for name in self.tap_names]
            if not set(mine) <= set(full.tap_names):
                yield None
                return
            widths = [s[0] for s in full.channels(image_size)]
            starts = dict(zip([None, *full.tap_names], [sum(widths[:i]) for i in range(len(widths))]))
            width = dict(zip([None, *full.tap_names], widths))
            yield full, torch.cat([torch.arange(starts[n], starts[n] + width[n]) for n in [None, *mine]])
        finally:
            full.remove_hooks()

    @torch.no_grad()
    def channels(self, image_size: int) -> list[tuple[int, int, int]]:
        """The shapes of the maps for one image. Found on the meta device (shapes without values): a
        real pass at 4096 px takes seconds and gigabytes. A forward that needs values falls back to one."""
        was_training = self.training
        self.eval()
        try:
            meta = {k: v.to("meta") for k, v in [*self.named_parameters(), *self.named_buffers()]}
            x = torch.zeros(1, 3, image_size, image_size, device="meta")
            maps = torch.func.functional_call(self, meta, (x,))
        except (RuntimeError, NotImplementedError):  # too small an image, or an op without meta kernel
            for m in self._tapped:
                m.__dict__.pop("_graft_tap", None)
            device = next(self.model.parameters()).device
            maps = self(torch.zeros(1, 3, image_size, image_size, device=device))
        finally:
            self.train(was_training)
        return [tuple(m.shape[1:]) for m in maps]


def cut_backbone(model: nn.Module, cut: int) -> None:
    """Drop the last `cut` stages of a timm backbone in place, with its final 1x1 convolution and
    norm (timm's prune_intermediate_layers; by block stages where the model offers them, as
    EfficientNet's 7, else by feature stages). Its final map is then the last kept stage's."""
    prune = getattr(model, "prune_intermediate_layers", None)
    if prune is None:
        raise ValueError(f"{type(model).__name__}: timm cannot cut this architecture (no prune_intermediate_layers)")
    import inspect
    by_blocks = "extra_blocks" in inspect.signature(prune).parameters and hasattr(model, "blocks")
    stages = len(model.blocks) if by_blocks else len(model.feature_info) - 1   # the stem is index 0
    if not 0 < cut < stages:
        raise ValueError(f"backbone.cut {cut}: {type(model).__name__} has {stages} stages after its stem; "
                         f"cut 1 to {stages - 1} of them")
    prune(indices=[stages - cut], prune_norm=True, prune_head=True, **({"extra_blocks": True} if by_blocks else {}))
    model.graft_cut = cut   # block_names: the final map is now the last block's output


def block_names(model: nn.Module) -> list[str]:
    """Every block of every stage: the children of the containers that hold timm's feature_info
    stages (EfficientNet's blocks.S.B, ResNet's layerS.B). A model without stage containers (or
    without feature_info) falls back to its stages themselves. The last block is left out when it
    is the final map itself (ResNet's layer4's last block)."""
    modules = dict(model.named_modules())
    # a cut backbone (cut_backbone) still lists the stages it lost
    info = [i for i in getattr(model, "feature_info", None) or [] if i["module"] in modules]
    names: list[str] = []
    parents = dict.fromkeys(i["module"].rpartition(".")[0] for i in info)
    for parent in parents:
        container = modules.get(parent) if parent else model
        for stage_name, stage in container.named_children():
            full = f"{parent}.{stage_name}" if parent else stage_name
            if not any(i["module"] == full or i["module"].startswith(full + ".") for i in info) \
                    and not (parent and isinstance(stage, nn.Sequential)):
                continue  # the stem, pooling or the classifier: not a stage of blocks
            kids = list(stage.named_children()) if isinstance(stage, nn.Sequential) else []
            names += [f"{full}.{k}" for k, _ in kids] if kids else [full]
    last_is_final = info and info[-1]["module"] in names[-1:] + [names[-1].rpartition(".")[0]] \
        and info[-1]["num_chs"] == model.num_features
    if names and (last_is_final or getattr(model, "graft_cut", 0)):  # a cut backbone ends in its last block
        names = names[:-1]
    return names


def _last_block(name: str, modules: dict) -> str:
    """A Sequential's output is its last child's: the innermost module that gives `name`'s output."""
    while isinstance(modules.get(name), nn.Sequential) and len(modules[name]):
        name = f"{name}.{list(modules[name].named_children())[-1][0]}"
    return name


def _keep_output(module, _inputs, output):
    # Kept on the tapped module itself, not in a dict the hook closes over: a deep copy of the model
    # (MAC counters, pruning, ensembles) then taps its own modules instead of the original's.
    module.__dict__["_graft_tap"] = output


class Pool(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if self.mode == "flatten":
            return torch.flatten(maps[0], 1)
        return torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1)

    def out_features(self, shapes: list[tuple[int, int, int]]) -> int:
        if self.mode == "flatten":
            c, h, w = shapes[0]
            return c * h * w
        return sum(s[0] for s in shapes)


def make_mlp(in_features: int, num_classes: int, cfg: HeadConfig) -> nn.Sequential:
    """The paper's Flatten -> Dense(256, ReLU) -> Dropout(0.5) -> Dense(classes), any widths."""
    layers: list[nn.Module] = []
    width = in_features
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[cfg.activation]()]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class GatedHead(nn.Module):
    """A finished run's head kept beside a prototype head for the classes added later (`graft extend`).

    `old` is the run's MLP over its own `old_classes` classes; `proto` scores every class, old and
    new. The logits are log-probabilities, with z = proto(x) * scales[1]:
        old class c: log p(old | x) + log softmax(old(x) * scales[0])_c
        new class c: log p(new | x) + log softmax(z_new)_c
    where p(old | x) is the sum of softmax(z) over the old classes. Among the old classes the ranking
    is the old MLP's (one shift per row), so the extension cannot change which old class a row is
    given; the new classes are the prototype's. `scales` (inverse temperatures) are calibrated on
    validation rows by the extension and saved with the weights: the architecture needs only the
    number of old classes (model.json's `gate`).
    """

    def __init__(self, old: nn.Module, proto: nn.Module, old_classes: int):
        super().__init__()
        self.old, self.proto, self.old_classes = old, proto, old_classes
        self.register_buffer("scales", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_logits(self.old(x), self.proto(x), self.old_classes, self.scales)


def gated_logits(old: torch.Tensor, z: torch.Tensor, k: int, scales: torch.Tensor) -> torch.Tensor:
    """GatedHead's output from its two heads' logits (also what its calibration fits the scales on)."""
    old, z = torch.log_softmax(old * scales[0], 1), z * scales[1]
    group = torch.log_softmax(torch.stack([z[:, :k].logsumexp(1), z[:, k:].logsumexp(1)], 1), 1)
    return torch.cat([old + group[:, :1], torch.log_softmax(z[:, k:], 1) + group[:, 1:]], 1)


def make_head(in_features: int, num_classes: int, cfg: HeadConfig, gate: dict | None = None) -> nn.Module:
    """The head a model.json describes: the MLP of `cfg`, or with `gate` ({"old_classes": k,
    "hidden": widths}) a GatedHead whose old MLP is `cfg`'s over the first k classes and whose
    prototype head is an MLP of `hidden` (ReLU, no dropout) over all of them."""
    if not gate:
        return make_mlp(in_features, num_classes, cfg)
    proto_cfg = HeadConfig(pool=cfg.pool, hidden=list(gate["hidden"]), activation="relu", dropout=0.0)
    return GatedHead(make_mlp(in_features, gate["old_classes"], cfg),
                     make_mlp(in_features, num_classes, proto_cfg), gate["old_classes"])


class GraftedModel(nn.Module):
    def __init__(self, extractor: FeatureExtractor, pool: Pool, mlp: nn.Sequential):
        super().__init__()
        self.extractor, self.pool, self.mlp = extractor, pool, mlp

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.extractor(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(x).float())
