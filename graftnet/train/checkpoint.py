"""Checkpoints of the last completed epoch, for --resume: one safetensors file, no pickle.

Weights, optimizer moments and RNG states are tensors; epoch, step, history and the optimizer's
hyperparameters go into the file's JSON metadata. One file written with temp-and-rename means a
kill at any moment leaves the previous epoch's checkpoint intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import GraftError
from ..io import save_tensors
from .loop import State

FILE = "checkpoint/last.safetensors"


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], optimizer, state: State,
                    generator: torch.Generator) -> None:
    tensors = {f"model/{k}": v.detach().cpu() for k, v in weights.items()}
    opt = optimizer.state_dict()
    for idx, slots in opt["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{slot}"] = value.detach().cpu()
            elif value is not None:
                tensors[f"optim/{idx}/{slot}"] = torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/generator"] = generator.get_state()
    meta = {"epoch": state.epoch, "step": state.step, "history": state.history,
            "param_groups": opt["param_groups"]}
    save_tensors(run_dir / FILE, tensors, {"graftnet": json.dumps(meta)})


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer,
                    generator: torch.Generator) -> State:
    path = run_dir / FILE
    if not path.is_file():
        raise GraftError(f"{run_dir}: nothing to resume (no completed epoch: {FILE} is missing)")
    tensors = {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["graftnet"])
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing = [k for k in weights if k not in model.state_dict()]
    if missing:
        raise GraftError(f"{path}: checkpoint does not match the model (e.g. {missing[:3]})")
    model.load_state_dict(weights, strict=False)
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, slot = k.split("/", 2)
            opt_state.setdefault(int(idx), {})[slot] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    generator.set_state(tensors["rng/generator"])
    return State(epoch=meta["epoch"], step=meta["step"], history=meta["history"])
