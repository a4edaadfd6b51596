"""Where images come from: a class folder, a ZIP with class folders (read in place), or the
CIFAR-10 python archive. Every source lists (key, label) samples per split and reads raw bytes or
arrays by key; decoding lives in `images.py`.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import cache_root
from .files import IMAGE_EXTENSIONS, list_images

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
# Files that operating systems and archivers leave behind; never data.
_JUNK = {"thumbs.db", "desktop.ini"}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Source:
    """Samples per split and a way to read each one."""
    location: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]          # split name -> [(key, label)]
    fingerprint: str                                   # changes when any file changes
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # in-memory images
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)

    def read(self, key: str) -> bytes | np.ndarray:
        if key in self.arrays:
            return self.arrays[key]
        # A damaged ZIP member (bad CRC, broken deflate stream) or a file that vanished is the user's
        # data problem: say which file as a DataError (which --skip-bad skips), not a traceback.
        try:
            if self._zip is not None:
                return self._zip.read(key)
            return (Path(self.location) / key).read_bytes()
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{self.describe(key)}: cannot read the file ({e})") from None

    def describe(self, key: str) -> str:
        """A path a user can find: 'archive.zip:member' or the file's path."""
        if self._zip is not None or self.arrays:
            return f"{self.location}:{key}"
        return str(Path(self.location) / key)


def _is_junk(part: str) -> bool:
    return part.startswith(".") or part.lower() in _JUNK or part == "__MACOSX"


def _layout(location: str, files: list[tuple[str, str]], dirs: set[str]) -> tuple[list[str], dict]:
    """From (key, relative path) pairs and directory paths, find classes and splits.

    Accepts root/<class>/... or root/<split>/<class>/..., under any chain of single wrapper folders
    (a ZIP of `cifar10/train/cat/1.jpg` works as is).
    """
    paths = [(k, [p for p in rel.split("/") if p]) for k, rel in files]
    paths = [(k, p) for k, p in paths if not any(_is_junk(x) for x in p)]
    dir_parts = [[p for p in d.split("/") if p] for d in dirs]
    dir_parts = [d for d in dir_parts if d and not any(_is_junk(x) for x in d)]
    prefix: list[str] = []
    while True:
        tops = {p[len(prefix)] for _, p in paths if len(p) > len(prefix) + 1}
        loose = [p for _, p in paths if len(p) == len(prefix) + 1]
        if len(tops) == 1 and not loose and next(iter(tops)).lower() not in SPLIT_NAMES:
            prefix.append(next(iter(tops)))
            continue
        break
    depth = len(prefix)
    inside = [(k, p[depth:]) for k, p in paths if p[:depth] == prefix]
    subdirs = [d[depth:] for d in dir_parts if d[:depth] == prefix and len(d) > depth]
    loose_images = [k for k, p in inside if len(p) == 1 and Path(p[0]).suffix.lower() in IMAGE_EXTENSIONS]
    if loose_images:
        raise DataError(f"{location}: image {loose_images[0]} lies outside any class folder; expected "
                        "<root>/<class>/<image> or <root>/train|test/<class>/<image>")
    inside = [(k, p) for k, p in inside if len(p) > 1]  # README and the like at the root are ignored
    tops = sorted({p[0] for _, p in inside} | {d[0] for d in subdirs})
    split_dirs = [t for t in tops if t.lower() in SPLIT_NAMES]
    if not tops:
        raise DataError(f"{location}: no class folders found; expected <root>/<class>/<image> "
                        "(one folder per class) or <root>/train|test/<class>/<image>")

    def collect(entries, dirs_below, where):
        classes = sorted({p[0] for _, p in entries if len(p) > 1} | {d[0] for d in dirs_below})
        if not classes:
            raise DataError(f"{where}: no class folders found inside")
        by_class: dict[str, list[str]] = {c: [] for c in classes}
        for key, p in entries:
            if len(p) > 1:
                by_class[p[0]].append(key)
        empty = [c for c, keys in by_class.items() if not keys]
        if empty:
            raise DataError(f"{where}: class folder(s) {', '.join(empty)} contain no files; "
                            "remove them or add images")
        return by_class

    if not split_dirs:
        by_class = collect(inside, subdirs, location)
        classes = sorted(by_class)
        return classes, {"all": [(k, classes.index(c)) for c in classes for k in sorted(by_class[c])]}
    other = [t for t in tops if t not in split_dirs]
    if other:
        raise DataError(f"{location}: mixes split folders ({', '.join(split_dirs)}) with other folders "
                        f"({', '.join(other[:5])}); put every class folder inside a split")
    per_split = {}
    for s in split_dirs:
        entries = [(k, p[1:]) for k, p in inside if p[0] == s]
        below = [d[1:] for d in subdirs if d[0] == s and len(d) > 1]
        per_split[s] = collect(entries, below, f"{location}/{s}")
    train_name = next((s for s in split_dirs if s.lower() == "train"), None)
    if train_name is None:
        raise DataError(f"{location}: has {', '.join(split_dirs)} but no train/ folder")
    classes = sorted(per_split[train_name])
    for s, by_class in per_split.items():
        missing = sorted(set(classes) - set(by_class))
        extra = sorted(set(by_class) - set(classes))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"class(es) missing from {s}/: {', '.join(missing)}")
            if extra:
                parts.append(f"class(es) in {s}/ but not in train/: {', '.join(extra)}")
            raise DataError(f"{location}: splits do not match: " + "; ".join(parts))
    splits = {}
    for s, by_class in per_split.items():
        name = "train" if s == train_name else ("test" if s.lower() == "test" else "val")
        splits[name] = [(k, classes.index(c)) for c in classes for k in sorted(by_class[c])]
    return classes, splits


def _hash(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
    return h.hexdigest()[:16]


def open_folder(root: Path) -> Source:
    files, dirs, stats = [], set(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        if rel_dir:
            dirs.add(rel_dir)
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            files.append((rel, rel))
            st = os.stat(os.path.join(dirpath, name))
            stats.append((rel, st.st_size, st.st_mtime_ns))
    classes, splits = _layout(str(root), files, dirs)
    return Source(str(root), classes, splits, _hash(stats))


def open_unlabeled(root: Path, classes: list[str]) -> Source:
    """Every image file under a folder, in any layout, as the split "all" with label -1: images
    that something else labels (a distillation teacher)."""
    files = list_images(root)
    keys = [p.relative_to(root).as_posix() for p in files]
    stats = [(k, st.st_size, st.st_mtime_ns) for k, st in zip(keys, (p.stat() for p in files))]
    return Source(str(root), list(classes), {"all": [(k, -1) for k in keys]}, _hash(stats))


def open_zip(path: Path) -> Source:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable ZIP archive ({e})") from None
    infos = zf.infolist()
    files = [(i.filename, i.filename) for i in infos if not i.is_dir()]
    dirs = {i.filename.rstrip("/") for i in infos if i.is_dir()}
    for name, _ in files:  # folders implied by member paths
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[:i + 1]) for i in range(len(parts)))
    classes, splits = _layout(str(path), files, dirs)
    # CRCs are content hashes, so the fingerprint follows the images, not the archive's timestamps.
    fp = _hash((i.filename, i.file_size, i.CRC) for i in infos)
    return Source(str(path), classes, splits, fp, _zip=zf)


def open_cifar10_archive(path: Path) -> Source:
    """Read cifar-10-python.tar.gz with the restricted unpickler (its batches are pickles)."""
    from ..safe_pickle import safe_loads
    arrays, splits = {}, {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
            missing = [n for n in names if n not in members]
            if missing:
                raise DataError(f"{path}: not a CIFAR-10 python archive (missing {', '.join(missing)})")
            for n in names:
                batch = safe_loads(tar.extractfile(members[n]).read(), f"{path}:{n}")
                # The real archive's Python 2 pickles load with str keys ("data"), but batches pickled
                # by Python 3 keep bytes keys (b"data"): accept both, and say so when neither is there.
                if isinstance(batch, dict):
                    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
                if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
                    raise DataError(f"{path}:{n}: not a CIFAR-10 batch (expected a dict with data and labels)")
                data = np.asarray(batch["data"], dtype=np.uint8)
                if data.size % 3072:
                    raise DataError(f"{path}:{n}: data is not a whole number of 32x32 RGB images")
                data = data.reshape(-1, 3, 32, 32)
                split = "test" if n == "test_batch" else "train"
                for j, (img, label) in enumerate(zip(data, batch["labels"])):
                    key = f"{split}/{n}/{j:05d}"
                    arrays[key] = img.transpose(1, 2, 0)  # HWC like a decoded image
                    splits[split].append((key, int(label)))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the archive ({e})") from None
    return Source(str(path), list(CIFAR10_CLASSES), splits, _file_md5(path)[:16], arrays=arrays)


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_cifar10(cache_dir: str | None = None, download: bool = True, search_shared: bool = True) -> Path:
    """The shared JPEG copy when it is beside the project, else the cached or downloaded archive.

    `search_shared=False` skips the shared copy (beside the cwd or the package), so tests can check
    the not-found path on a machine that has one.
    """
    env = os.environ.get("GRAFTNET_CIFAR10")
    candidates = [Path(env)] if env else []
    if search_shared:
        here = Path.cwd()
        candidates += [p / "shared" / "datasets" / "cifar10-jpeg.zip" for p in (here.parent, here)]
        candidates += [Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifar10-jpeg.zip"]
    for c in candidates:
        if c.is_file():
            return c
    archive = cache_root(cache_dir) / "datasets" / "cifar-10-python.tar.gz"
    if archive.is_file():
        return archive
    if download:
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_suffix(".part")
        try:
            urllib.request.urlretrieve(CIFAR10_URL, tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"CIFAR-10 is not in the cache ({archive}) and could not be downloaded ({e}). "
                "Point --data at a copy: a folder or ZIP with class folders, or cifar-10-python.tar.gz"
            ) from None
        if _file_md5(tmp) != CIFAR10_MD5:
            tmp.unlink(missing_ok=True)
            raise DataError(f"downloaded CIFAR-10 failed its checksum (expected md5 {CIFAR10_MD5}); try again")
        os.replace(tmp, archive)
        return archive
    raise DataError(f"CIFAR-10 not found (looked for {candidates[0] if candidates else 'the shared ZIP'} "
                    f"and {archive}); point --data at a copy")


def open_source(location: str, cache_dir: str | None = None) -> Source:
    if location.lower() in ("cifar10", "cifar-10"):
        location = str(find_cifar10(cache_dir))
    path = Path(location).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data path does not exist")
    if path.is_dir():
        return open_folder(path)
    if path.name.endswith((".tar.gz", ".tgz")):
        return open_cifar10_archive(path)
    if zipfile.is_zipfile(path):
        return open_zip(path)
    raise DataError(f"{path}: not a folder, ZIP archive or CIFAR-10 python archive")
