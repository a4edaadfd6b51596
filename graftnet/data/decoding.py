"""Decoding samples into uint8 squares, in worker processes or threads, a chunk at a time.

Chunks come back in order and at most a few are in flight, so memory holds a handful of chunks
whatever the number of images: the caller writes each to memory or to a record file
(records.py) and drops it. A chunk travels as one buffer of records laid end to end, which the
record file takes as it is.

Threads (the default, `data.decode_in: threads`) do the work in this process; PIL releases the GIL
while it decodes and resizes, so they scale. Worker processes (`processes`) are torch's DataLoader,
as torchvision's and timm's loaders use: they keep a decoder's allocations (a large scan is
hundreds of MB for a moment) out of the training process, and serve a decoder that holds the GIL.
Threads are the default by measurement (bench/streaming.py, BENCHMARKS.md "Data larger than
memory"): on this project's 2-core CPU they decoded 256 px JPEGs 1.15x and CIFAR's 32 px JPEGs 2.2x
faster than two worker processes, which pay for handing every chunk across.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import DataError
from .pixels import decode, square_array
from .sources import Source

CHUNK = 64  # images a worker decodes per hand-over


def decode_chunk(source: Source, items, size: int, gray: bool) -> tuple[np.ndarray, list[int], list[str | None]]:
    """(records end to end, side of each decoded record, per item None or why it was not decoded)."""
    arrays, sides, errors = [], [], []
    for key, _ in items:
        try:
            a = square_array(decode(source.read(key), source.describe(key), gray), size)
        except DataError as e:
            errors.append(str(e))
            continue
        arrays.append(a.reshape(-1))
        sides.append(a.shape[1])
        errors.append(None)
    return (np.concatenate(arrays) if arrays else np.empty(0, np.uint8)), sides, errors


def decoded_chunks(source: Source, samples, size: int, gray: bool, workers: int, processes: bool = False):
    """Yield (chunk of samples, decode_chunk's result) in sample order."""
    chunks = [samples[i:i + CHUNK] for i in range(0, len(samples), CHUNK)]
    if processes and len(chunks) > 1:
        yield from _in_processes(source, chunks, size, gray, workers)
        return
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append((c, pool.submit(decode_chunk, source, c, size, gray)))
            if len(pending) > 2 * workers:
                done, fut = pending.popleft()
                yield done, fut.result()
        while pending:
            done, fut = pending.popleft()
            yield done, fut.result()


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, source: Source, chunks, size: int, gray: bool):
        self.source, self.chunks, self.size, self.gray = source, chunks, size, gray

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, c: int):
        blob, sides, errors = decode_chunk(self.source, self.chunks[c], self.size, self.gray)
        return torch.from_numpy(blob), sides, errors  # a tensor crosses to the parent in shared memory


def _reopen(_worker: int) -> None:
    # a forked worker shares the parent's open ZIP file and its position: reading it from two
    # processes at once would interleave their seeks, so each worker opens its own
    torch.utils.data.get_worker_info().dataset.source.reopen()


def _in_processes(source: Source, chunks, size: int, gray: bool, workers: int):
    loader = torch.utils.data.DataLoader(_Chunks(source, chunks, size, gray), batch_size=None,
                                         num_workers=workers, worker_init_fn=_reopen, prefetch_factor=2)
    for c, (blob, sides, errors) in zip(chunks, loader):
        yield c, (blob.numpy(), sides, errors)
