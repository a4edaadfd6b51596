"""Data-parallel training under `torchrun --nproc-per-node N graft train ...` (PyTorch DDP).

Every process draws the same global batch from the same seeded generator and trains on its own
contiguous slice of it, so N processes with global batch B step like one process with batch B (DDP
averages the slices' gradients). Batches are assembled whole on every rank before slicing: resizing
and augmenting are cheap next to the backbone, and the random draws then match a single process.
Only rank 0 writes the run folder; checkpoints hold no per-process state, so a run resumes on any
number of processes. Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from ..ranks import is_main, rank, world  # noqa: F401 (a leaf, so that progress.py can ask too)


def init_from_env() -> None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU). The long timeout
    covers rank 0 alone filling the feature cache while the others wait for it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or world() > 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's value of a picklable object, on every rank (trusted: our own processes)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(values: list[float]) -> list[float]:
    """Each value summed over all processes (a no-op in one process): epoch totals of the slices."""
    if world() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard(batches):
    """Each rank's contiguous slice of every global batch (sizes differ by one at most). A batch
    smaller than the world goes whole to every rank: equal gradients average to the same step."""
    n, r = world(), rank()
    if n == 1:
        yield from batches
        return
    for x, y in batches:
        if len(y) < n:
            yield x, y
        else:
            yield torch.tensor_split(x, n)[r], torch.tensor_split(y, n)[r]


class Replicated(nn.Module):
    """DDP around `module`, rebuilt whenever the set of trainable parameters changes (gradual
    unfreezing): DDP fixes its gradient buckets when it is built. Without a process group it is
    the module itself."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._key = None
        object.__setattr__(self, "_ddp", None)  # not a submodule: its parameters are module's

    def train(self, mode: bool = True):
        super().train(mode)
        if self._ddp is not None:
            self._ddp.training = mode
        return self

    def no_sync(self):
        """Skip DDP's gradient all-reduce for this backward (the chunks of a batch before its last:
        the last one's all-reduce then averages the accumulated gradients)."""
        return self._ddp.no_sync() if self._ddp is not None and world() > 1 else contextlib.nullcontext()

    def forward(self, x):
        if world() == 1:
            return self.module(x)
        key = tuple(p.requires_grad for p in self.module.parameters())
        if key != self._key:
            from torch.nn.parallel import DistributedDataParallel
            object.__setattr__(self, "_ddp", DistributedDataParallel(self.module))
            self._key = key
            self._ddp.training = self.training
        return self._ddp(x)
