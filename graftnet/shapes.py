"""Record and re-apply the layer sizes that structured pruning changed, as plain JSON values.

Channel pruning shrinks convolutions, BatchNorms and Linears in place, so the saved weights no longer
fit the registry's architecture. Instead of pickling the pruned module tree, model.json lists, per
changed module, its size attributes (in/out channels, groups, ...) and the shapes of its own tensors;
`load_model` builds the stock architecture, resizes those modules, then loads the safetensors
strictly. Only the attribute names below and a module's existing tensors can be touched: a model.json
cannot make the loader set anything else.
"""
from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from .errors import GraftError

SIZE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
              "normalized_shape", "num_channels", "num_groups")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in chain(module.named_parameters(recurse=False),
                                   module.named_buffers(recurse=False)) if v is not None}


def module_shapes(model: nn.Module) -> dict[str, dict]:
    """{module name: {"attrs": {size attribute: value}, "tensors": {name: shape}}} for every module."""
    out = {}
    for name, m in model.named_modules():
        attrs = {a: list(v) if isinstance(v, tuple) else v for a in SIZE_ATTRS
                 if isinstance(v := getattr(m, a, None), (int, tuple)) and not isinstance(v, bool)}
        tensors = {k: list(v.shape) for k, v in _tensors(m).items()}
        if attrs or tensors:
            out[name] = {"attrs": attrs, "tensors": tensors}
    return out


def shape_changes(before: dict, after: dict) -> dict:
    """The modules of `after` whose sizes differ from `before` (both from module_shapes)."""
    return {name: entry for name, entry in after.items() if before.get(name) != entry}


def _ints(value, where: str) -> None:
    items = value if isinstance(value, list) else [value]
    if not items and isinstance(value, list):
        return
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise GraftError(f"{where}: expected non-negative integers, got {value!r}")


def apply_shapes(model: nn.Module, changes: dict, where: str = "model.json") -> None:
    """Resize the named modules of a freshly built model to the recorded sizes (values are left
    uninitialised: the caller loads the saved weights next)."""
    if not isinstance(changes, dict):
        raise GraftError(f"{where}: 'pruned' must be a mapping of module names to sizes")
    modules = dict(model.named_modules())
    for name, entry in changes.items():
        module = modules.get(name)
        if module is None or not isinstance(entry, dict):
            raise GraftError(f"{where}: pruned module {name!r} does not exist in this architecture")
        for attr, value in (entry.get("attrs") or {}).items():
            if attr not in SIZE_ATTRS or not hasattr(module, attr):
                raise GraftError(f"{where}: {name}.{attr} is not a size attribute of the module")
            _ints(value, f"{where}: {name}.{attr}")
            setattr(module, attr, tuple(value) if isinstance(getattr(module, attr), tuple) else value)
        own = _tensors(module)
        for key, shape in (entry.get("tensors") or {}).items():
            if key not in own:
                raise GraftError(f"{where}: {name} has no tensor {key!r}")
            _ints(shape, f"{where}: {name}.{key} shape")
            old = own[key]
            new = torch.empty(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[key] = new
