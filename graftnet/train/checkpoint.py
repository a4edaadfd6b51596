"""Checkpoints of the last completed epoch, for --resume: one safetensors file, no pickle.

Weights, optimizer moments and RNG states are tensors; epoch, step, history and the optimizer's
hyperparameters go into the file's JSON metadata. One file written with temp-and-rename means a
kill at any moment leaves the previous epoch's checkpoint intact. Optimizer state is stored by
parameter name and group name (optimizers built from named parameters), so the resumed run's
optimizer, rebuilt from the model, gets each moment back by name, not by position.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import GraftError
from ..io import save_tensors
from ..model import trainable_state
from ..run import write_history
from .distributed import is_main
from .loop import Callback, State

FILE = "checkpoint/last.safetensors"


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], optimizer, state: State,
                    generator: torch.Generator, extra: dict | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """`optimizer` None: between stages that each start a fresh optimizer. `extra`: JSON-able state
    of the caller (e.g. pruning's schedule), given back by checkpoint_meta; `extra_tensors` (e.g. a
    weight average), given back by checkpoint_tensors."""
    tensors = {f"model/{k}": v.detach().cpu() for k, v in weights.items()}
    tensors.update({f"extra/{k}": v.detach().cpu() for k, v in (extra_tensors or {}).items()})
    opt = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": []}
    names = _param_names(opt)
    for idx, slots in opt["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{names[idx]}/{slot}"] = value.detach().cpu()
            elif value is not None:
                tensors[f"optim/{names[idx]}/{slot}"] = torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/generator"] = generator.get_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"epoch": state.epoch, "step": state.step, "history": state.history,
            "param_groups": opt["param_groups"], "extra": extra or {}}
    save_tensors(run_dir / FILE, tensors, {"graftnet": json.dumps(meta)})


class Checkpointer(Callback):
    """After each epoch: what training changed (the head; with `full`, the whole model: fine-tuning
    moves backbone weights and BatchNorm statistics), optimizer, RNG, history, `extra` and the
    tensors `tensors()` returns."""

    def __init__(self, run_dir: Path, model, optimizer, generator, full: bool = False,
                 extra: dict | None = None, tensors=None):
        self.run_dir, self.model, self.optimizer, self.generator = run_dir, model, optimizer, generator
        self.full, self.extra, self.tensors = full, extra, tensors

    def after_epoch(self, state: State, row: dict) -> None:
        if not is_main():
            return
        weights = self.model.state_dict() if self.full else trainable_state(self.model)
        save_checkpoint(self.run_dir, weights, self.optimizer, state, self.generator, self.extra,
                        self.tensors() if self.tensors else None)
        write_history(self.run_dir, state.history)


def _param_names(opt_state: dict) -> dict[int, str]:
    """Optimizer index -> parameter name (the index itself for optimizers of unnamed parameters)."""
    out = {}
    for g in opt_state["param_groups"]:
        out.update(zip(g["params"], g.get("param_names") or [str(i) for i in g["params"]]))
    return out


def checkpoint_meta(run_dir: Path) -> dict | None:
    """The checkpoint's metadata (epoch, step, history, extra), without loading tensors; None
    without a checkpoint."""
    path = run_dir / FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["graftnet"])


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The caller's `extra_tensors` from the checkpoint (empty without a checkpoint or any)."""
    path = run_dir / FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        return {k[len("extra/"):]: f.get_tensor(k) for k in f.keys() if k.startswith("extra/")}


def checkpoint_epoch(run_dir: Path) -> int:
    """Epochs completed by the checkpoint in run_dir (0 without one)."""
    meta = checkpoint_meta(run_dir)
    return meta["epoch"] if meta else 0


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer,
                    generator: torch.Generator, optimizer_state: bool = True) -> State:
    """Restore weights, RNG and loop state; the optimizer's too unless `optimizer_state` is False
    (a new stage starts its optimizer afresh)."""
    path = run_dir / FILE
    if not path.is_file():
        raise GraftError(f"{run_dir}: nothing to resume (no completed epoch: {FILE} is missing)")
    tensors = {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["graftnet"])
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = model.state_dict()
    missing = [k for k in weights if k not in own]
    if missing:
        raise GraftError(f"{path}: checkpoint does not match the model (e.g. {missing[:3]})")
    shapes = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in weights.items()
              if v.shape != own[k].shape]
    if shapes:
        raise GraftError(f"{path}: checkpoint shapes do not match the model, e.g. {shapes[0]}")
    model.load_state_dict(weights, strict=False)
    if optimizer_state:
        optimizer.load_state_dict(_by_name(optimizer.state_dict(), meta["param_groups"], tensors, path))
    torch.set_rng_state(tensors["rng/torch"])
    generator.set_state(tensors["rng/generator"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return State(epoch=meta["epoch"], step=meta["step"], history=meta["history"])


def _by_name(current: dict, saved_groups: list[dict], tensors: dict, path: Path) -> dict:
    """The optimizer state dict for the current optimizer, filled from the saved one by names."""
    saved_by_name = {g.get("name", str(i)): g for i, g in enumerate(saved_groups)}
    groups = []
    for i, g in enumerate(current["param_groups"]):
        saved = saved_by_name.get(g.get("name", str(i)))
        if saved is None:
            raise GraftError(f"{path}: optimizer group {g.get('name', i)!r} is not in the checkpoint "
                             f"(it has {sorted(saved_by_name)}); was the config changed?")
        groups.append({**saved, "params": g["params"], **({"param_names": g["param_names"]}
                                                            if "param_names" in g else {})})
    index = {name: idx for idx, name in _param_names(current).items()}
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            name, slot = k[len("optim/"):].rsplit("/", 1)
            if name not in index:
                raise GraftError(f"{path}: optimizer state for unknown parameter {name!r}")
            state.setdefault(index[name], {})[slot] = v
    return {"state": state, "param_groups": groups}
