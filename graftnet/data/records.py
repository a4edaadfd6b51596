"""Decoded images kept in a file of records and read per batch, so memory does not grow with the data.

Holding every decoded square in RAM caps a run at what memory holds: at 224 px an image is 150 KB,
so a 24 GB machine holds about 150k images and nothing else, while the features a frozen run
trains on would fit many times over. Here the squares go, as they are decoded, to one file of
uint8 records (3 x s x s each, s per record in the index), and a batch reads its records back with
`os.pread`: the process holds a batch; the operating system's page cache holds what fits and reads
the rest again. `numpy.memmap` would read them too, but every page it touches counts in the
process's resident memory until the kernel takes it back, so a reading of peak memory (or a
cgroup's own accounting of mapped pages) could not tell a bounded run from one that is not.

No library does this for decoded image squares of mixed sizes with a per-split index (WebDataset,
FFCV and LitData each bring their own file formats, loaders and a second data pipeline); the
record file is a few lines of pread.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class _Images(Sequence):
    """A sequence of images read one at a time by `_one`; a slice is a list of them."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(len(self)))]
        return self._one(i + len(self) if i < 0 else i)

    def __iter__(self):
        return (self._one(i) for i in range(len(self)))

    def _one(self, i: int) -> torch.Tensor:
        raise NotImplementedError


class DiskImages(_Images):
    """uint8 squares (3 x s x s) read from a record file on demand; rows: which records, in order."""

    def __init__(self, path: str | Path, offsets: np.ndarray, sides: np.ndarray, rows: np.ndarray | None = None):
        self.path = str(path)
        self.offsets, self.sides = np.asarray(offsets, np.int64), np.asarray(sides, np.int64)
        self.rows = np.arange(len(self.offsets)) if rows is None else np.asarray(rows, np.int64)
        self._fd: int | None = None
        self._pid = -1

    def _file(self) -> int:
        # one descriptor per process: a forked worker must not share the parent's (pread takes an
        # offset of its own, so threads share one safely)
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __len__(self) -> int:
        return len(self.rows)

    def _one(self, i: int) -> torch.Tensor:
        r = self.rows[i]
        s = int(self.sides[r])
        n = 3 * s * s
        data = os.pread(self._file(), n, int(self.offsets[r]))
        if len(data) != n:
            raise OSError(f"{self.path}: record {r} is cut short ({len(data)} of {n} bytes); delete "
                          "the cache folder's decoded/ entry to decode the images again")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(3, s, s)

    def take(self, idx) -> "DiskImages":
        """The records at positions idx of this sequence, without reading them."""
        return DiskImages(self.path, self.offsets, self.sides, self.rows[np.asarray(list(idx), np.int64)])

    @property
    def nbytes(self) -> int:
        return int((3 * self.sides[self.rows] ** 2).sum())

    def load(self) -> list[torch.Tensor]:
        """Every record in memory: one read of the whole file, split into views."""
        blob = torch.empty(os.path.getsize(self.path), dtype=torch.uint8)
        with open(self.path, "rb") as f:  # straight into the tensor: no second copy of the file
            f.readinto(memoryview(blob.numpy()))
        return [blob[int(self.offsets[r]):int(self.offsets[r]) + 3 * int(self.sides[r]) ** 2]
                .view(3, int(self.sides[r]), int(self.sides[r])) for r in self.rows]

    def __getstate__(self):  # a descriptor does not travel to another process
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


class Picked(_Images):
    """Positions idx of any sequence of images, read when asked for."""

    def __init__(self, base: Sequence, idx):
        self.base, self.idx = base, list(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def _one(self, i: int) -> torch.Tensor:
        return self.base[self.idx[i]]


class Joined(_Images):
    """Two sequences of images, one after the other."""

    def __init__(self, first: Sequence, second: Sequence):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def _one(self, i: int) -> torch.Tensor:
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


def pick(images: Sequence, idx) -> Sequence:
    """images[idx] as the same kind of sequence: a list stays a list, records stay on disk."""
    if isinstance(images, list):
        return [images[i] for i in idx]
    if isinstance(images, DiskImages):
        return images.take(idx)
    return Picked(images, idx)


def join(first: Sequence, second: Sequence) -> Sequence:
    if isinstance(first, list) and isinstance(second, list):
        return first + second
    return Joined(first, second)


class RecordWriter:
    """Appends decoded squares to `path`'s temporary twin; `finish` renames it into place, so a
    killed or failed decode never leaves a file that looks complete."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._f = open(self.tmp, "wb")
        self.offsets: list[int] = []
        self.sides: list[int] = []
        self._at = 0

    def add_block(self, blob: np.ndarray, sides: list[int]) -> None:
        """Records already laid end to end in one uint8 buffer (as the decoders hand them over)."""
        self._f.write(memoryview(np.ascontiguousarray(blob)).cast("B"))
        for s in sides:
            self.offsets.append(self._at)
            self.sides.append(s)
            self._at += 3 * s * s

    def finish(self) -> DiskImages:
        self._f.close()
        os.replace(self.tmp, self.path)
        return DiskImages(self.path, np.array(self.offsets, np.int64), np.array(self.sides, np.int64))

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def available_memory() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, or less where a cgroup
    (a container, `systemd-run -p MemoryMax=`) sets a lower limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_room()
    known = [v for v in (avail, cgroup) if v is not None]
    return min(known) if known else 8 << 30  # nothing to read: assume a small machine


def _cgroup_room() -> int | None:
    """What this process's memory cgroup (v2 or v1) still allows: its limit less what it holds
    apart from the file cache (which the kernel gives back under pressure); None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: memory.max, memory.current, memory.stat "file"
            base, files = Path("/sys/fs/cgroup") / rel.lstrip("/"), ("memory.max", "memory.current", "file")
        elif "memory" in controllers.split(","):  # v1
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
        else:
            continue
        try:
            limit = (base / files[0]).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "unlimited" as a huge number
                continue
            stat = dict(x.split() for x in (base / "memory.stat").read_text().splitlines())
            held = int((base / files[1]).read_text()) - int(stat.get(files[2], 0))
            return max(0, int(limit) - held)
        except (OSError, ValueError):
            continue
    return None
