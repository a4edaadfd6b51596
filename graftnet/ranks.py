"""Which process this is under torchrun (1 process and rank 0 without it).

A leaf: progress and logging ask "am I rank 0?" to speak for all processes, and they sit below the
training code that sets up data parallelism (train/distributed.py, which re-exports these).
"""
from __future__ import annotations

import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0
