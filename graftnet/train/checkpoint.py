"""Checkpoints for --resume: one safetensors file, no pickle.

One is written after every epoch, and where batches can be skipped (training on images, whose epochs
can take half an hour on a CPU) also every `every_s` seconds within an epoch: then it holds the
batches done, their sums, and the shuffling generator's state from before the epoch's order was
drawn, so a resumed run draws the same order and skips what is done.

Weights, optimizer moments and RNG states are tensors; epoch, step, history and the optimizer's
hyperparameters go into the file's JSON metadata. So does every callback's `state_dict()` (its
tensors under `callback/<key>/`, the rest in the metadata), handed back through `State.restored`
to the callback of the same key when the resumed fit starts. One file written with
temp-and-rename means a kill at any moment leaves the previous epoch's checkpoint intact. Optimizer state is stored by
parameter name and group name (optimizers built from named parameters), so the resumed run's
optimizer, rebuilt from the model, gets each moment back by name, not by position.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import GraftError
from ..io import save_tensors
from ..model import trainable_state
from ..progress import log
from ..run import write_history
from .distributed import is_main, sum_across, world
from .loop import Callback, State

FILE = "checkpoint/last.safetensors"


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], optimizer, state: State,
                    generator: torch.Generator, partial: dict | None = None, callbacks=None) -> None:
    """`optimizer` None: between stages that each start a fresh optimizer. The states of
    `callbacks` (default: the running fit's, state.callbacks) go in too. Within an epoch,
    `partial`: its sums over all processes (default: state.partial)."""
    tensors = {f"model/{k}": v.detach().cpu() for k, v in weights.items()}
    saved = {}
    for cb in state.callbacks if callbacks is None else callbacks:
        values = cb.state_dict()
        if values:
            saved[cb.key] = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"callback/{cb.key}/{k}": v.detach().cpu() for k, v in values.items()
                        if isinstance(v, torch.Tensor)})
    opt = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": []}
    names = _param_names(opt)
    for idx, slots in opt["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{names[idx]}/{slot}"] = value.detach().cpu()
            elif value is not None:
                tensors[f"optim/{names[idx]}/{slot}"] = torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    within = state.partial is not None and state.epoch_rng is not None
    tensors["rng/generator"] = state.epoch_rng if within else generator.get_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"epoch": state.epoch, "step": state.step, "history": state.history,
            "param_groups": opt["param_groups"], "callbacks": saved}
    if within:
        meta.update(batch=state.batch_in_epoch, partial=partial or state.partial)
    save_tensors(run_dir / FILE, tensors, {"graftnet": json.dumps(meta)})


class Checkpointer(Callback):
    """After each epoch, and every `every_s` seconds within one (0: never; taken only where the batch
    maker can skip batches, see State.epoch_rng): what training changed (the head; with `full`, the
    whole model: fine-tuning moves backbone weights and BatchNorm statistics), optimizer, RNG,
    history and every callback's state."""

    def __init__(self, run_dir: Path, model, optimizer, generator, full: bool = False, every_s: float = 0.0):
        self.run_dir, self.model, self.optimizer, self.generator = run_dir, model, optimizer, generator
        self.full, self.every_s = full, every_s
        self.last = time.monotonic()

    def after_step(self, state: State) -> None:
        if not self.every_s or state.epoch_rng is None or state.partial is None:
            return
        due = time.monotonic() - self.last >= self.every_s
        if world() > 1:  # rank 0's clock decides: the sums below are a collective every rank joins
            due = sum_across([float(due and is_main())])[0] > 0
        if not due:
            return
        keys = ("loss", "correct", "seen", "labeled")
        partial = {**state.partial, **dict(zip(keys, sum_across([state.partial[k] for k in keys])))}
        self._save(state, partial)

    def after_epoch(self, state: State, row: dict) -> None:
        self._save(state)

    def _save(self, state: State, partial: dict | None = None) -> None:
        self.last = time.monotonic()
        if not is_main():
            return
        t0 = time.perf_counter()
        weights = self.model.state_dict() if self.full else trainable_state(self.model)
        save_checkpoint(self.run_dir, weights, self.optimizer, state, self.generator, partial)
        if partial is None:
            write_history(self.run_dir, state.history)
        else:  # say so: a user about to stop a long epoch knows what a resume keeps
            log(f"checkpoint within epoch {state.epoch + 1}, after batch {state.batch_in_epoch} "
                f"({time.perf_counter() - t0:.1f}s)")


def _param_names(opt_state: dict) -> dict[int, str]:
    """Optimizer index -> parameter name (the index itself for optimizers of unnamed parameters)."""
    out = {}
    for g in opt_state["param_groups"]:
        out.update(zip(g["params"], g.get("param_names") or [str(i) for i in g["params"]]))
    return out


def checkpoint_meta(run_dir: Path) -> dict | None:
    """The checkpoint's metadata (epoch, step, history, callbacks' JSON state), checked, without
    loading tensors; None without a checkpoint."""
    path = run_dir / FILE
    return _read(path, tensors=False)[0] if path.is_file() else None


def checkpoint_epoch(run_dir: Path) -> int:
    """Epochs completed by the checkpoint in run_dir (0 without one; a checkpoint within an epoch
    counts the epochs before it)."""
    meta = checkpoint_meta(run_dir)
    return meta["epoch"] if meta else 0


def _damaged(path: Path, why: str) -> GraftError:
    # one file, replaced by temp-and-rename: there is no older one to go back to
    return GraftError(f"{path}: damaged checkpoint ({why}); it cannot be resumed. Train the run again "
                      f"with `graft train --config {path.parent.parent / 'config.yaml'}`")


def _read(path: Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors), or one GraftError. A kill cannot leave a half-written checkpoint, but a
    full disk, a copy cut short or an edit can: safetensors then raises its own error types."""
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("graftnet")
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        if text is None:
            raise ValueError("no graftnet metadata")
        meta = json.loads(text)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSON: all mean the same here
        raise _damaged(path, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}") from None
    problem = _meta_problem(meta)
    if problem:
        raise _damaged(path, problem)
    return meta, found


_META = {"epoch": int, "step": int, "history": list, "param_groups": list, "callbacks": dict,
         "batch": int, "partial": dict}
_WORDS = {int: "a non-negative integer", list: "a JSON list", dict: "a JSON object"}
_PARTIAL = ("loss", "correct", "seen", "labeled", "seconds")


def _meta_problem(meta) -> str | None:
    if not isinstance(meta, dict):
        return "its metadata is not a JSON object"
    for key, kind in _META.items():
        if key not in meta and key in ("epoch", "step", "history", "param_groups"):
            return f"metadata lacks {key!r}"
        value = meta.get(key)
        if key in meta and (not isinstance(value, kind) or isinstance(value, bool)
                            or (kind is int and value < 0)):
            return f"metadata {key!r} is {str(value)[:40]!r}, not {_WORDS[kind]}"
    nested = [*meta["history"], *meta["param_groups"], *meta.get("callbacks", {}).values()]
    if not all(isinstance(v, dict) for v in nested):
        return "metadata history, param_groups and callbacks must hold JSON objects"
    partial = meta.get("partial")
    if partial is not None and not all(isinstance(partial.get(k), (int, float)) for k in _PARTIAL):
        return f"metadata 'partial' lacks one of {', '.join(_PARTIAL)}"
    return None


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer,
                    generator: torch.Generator, optimizer_state: bool = True) -> State:
    """Restore weights, RNG and loop state; the optimizer's too unless `optimizer_state` is False
    (a new stage starts its optimizer afresh)."""
    path = run_dir / FILE
    if not path.is_file():
        raise GraftError(f"{run_dir}: nothing to resume (no completed epoch: {FILE} is missing)")
    meta, tensors = _read(path)
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
        _check_moments(optimizer, path)
    try:  # the RNG states are byte tensors of a fixed layout: torch checks it
        torch.set_rng_state(tensors["rng/torch"])
        generator.set_state(tensors["rng/generator"])
        if "rng/cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng/cuda"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise _damaged(path, f"random number state: {type(e).__name__}: {str(e)[:80]}") from None
    partial = meta.get("partial")
    if partial and not is_main():  # rank 0 carries the sums so far; the others add their own
        partial = {**{k: 0 for k in ("loss", "correct", "seen", "labeled")}, "seconds": partial["seconds"]}
    return State(epoch=meta["epoch"], step=meta["step"], history=meta["history"],
                 batch_in_epoch=meta.get("batch", 0), partial=partial, restored=_callback_states(meta, tensors, path))


def _check_moments(optimizer, path: Path) -> None:
    """Every saved moment has its parameter's shape (a scalar step count aside): torch checks
    nothing when loading, and a wrong one fails at the next step instead."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for slot, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise _damaged(path, f"optimizer {slot} of shape {tuple(value.shape)} for a "
                                         f"parameter of shape {tuple(p.shape)}")


def _callback_states(meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    """key -> the state_dict a callback saved (JSON values and tensors together)."""
    states = {key: dict(values) for key, values in meta.get("callbacks", {}).items()}
    for name, value in tensors.items():
        if name.startswith("callback/"):
            if "/" not in name[len("callback/"):]:
                raise _damaged(path, f"tensor {name!r} names no callback slot")
            key, slot = name[len("callback/"):].split("/", 1)
            states.setdefault(key, {})[slot] = value
    return states


def describe_position(state: State, n_batches: int) -> str:
    """Where a resumed run goes on, for its log."""
    if state.batch_in_epoch:
        return f"resuming epoch {state.epoch + 1} after batch {state.batch_in_epoch}/{n_batches}"
    return f"resuming after epoch {state.epoch}"


def _by_name(current: dict, saved_groups: list[dict], tensors: dict, path: Path) -> dict:
    """The optimizer state dict for the current optimizer, filled from the saved one by names."""
    saved_by_name = {str(g.get("name", i)): g for i, g in enumerate(saved_groups)}  # str: hashable
    groups = []
    for i, g in enumerate(current["param_groups"]):
        saved = saved_by_name.get(str(g.get("name", i)))
        if saved is None:
            raise GraftError(f"{path}: optimizer group {g.get('name', i)!r} is not in the checkpoint "
                             f"(it has {sorted(saved_by_name)}); was the config changed?")
        # a mangled setting would fail at the first step, far from the file; one the checkpoint
        # lacks (saved by an older torch) keeps the fresh optimizer's default
        wrong = next((k for k, v in g.items() if k not in ("params", "param_names") and k in saved
                      and _kind(saved[k]) != _kind(v)), None)
        if wrong:
            raise _damaged(path, f"optimizer group {g.get('name', i)!r}: setting {wrong!r} is "
                                 f"{str(saved[wrong])[:40]!r}, not a {_kind(g[wrong])}")
        groups.append({**g, **saved, "params": g["params"], **({"param_names": g["param_names"]}
                                                                 if "param_names" in g else {})})
    index = {name: idx for idx, name in _param_names(current).items()}
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            name, _, slot = k[len("optim/"):].rpartition("/")
            if name not in index:
                raise GraftError(f"{path}: optimizer state for unknown parameter {name!r}")
            state.setdefault(index[name], {})[slot] = v
    return {"state": state, "param_groups": groups}


def _kind(value) -> str:
    """A setting's kind as JSON keeps it: numbers alike, tuples come back as lists."""
    if isinstance(value, bool) or value is None:
        return repr(value) if value is None else "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "list" if isinstance(value, (list, tuple)) else type(value).__name__
