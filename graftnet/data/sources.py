"""Where images come from: a class folder, a ZIP with class folders (read in place), or the
CIFAR-10 python archive. Every source lists (key, label) samples per split and reads raw bytes or
arrays by key; decoding lives in `images.py`.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape

from ..errors import DataError
from ..io import cache_root
from ..progress import log
from .files import IMAGE_EXTENSIONS, list_images, why_unreadable

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
# Files that operating systems and archivers leave behind; never data.
_JUNK = {"thumbs.db", "desktop.ini"}

# A ZIP member is read into memory whole, so its size must be bounded before and while it is read.
# 64 MiB holds any photo or scan in practice (a 100-megapixel JPEG is ~30 MB); an image file much
# larger is past PIL's own 179-megapixel decompression-bomb limit in most formats anyway. Image
# formats are compressed already, so deflate gains little on them (about 1:1 on PNG or JPEG, 3:1 on
# a BMP photo): 100:1 comes only from near-constant data, a bomb, and below 4 MiB it costs nothing.
MAX_MEMBER_BYTES = 64 << 20
MAX_RATIO = 100
RATIO_FROM_BYTES = 4 << 20
# Deflate's output is bounded by what is asked of it; zipfile's bzip2 and LZMA readers inflate a
# whole chunk at once (a few KB of bzip2 can hold gigabytes), so those members are not read in place.
_BOUNDED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_EXTRACT = "; extract the archive and point --data at the folder"

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Source:
    """Samples per split and a way to read each one."""
    location: str
    classes: list[str]
    # split name -> [(key, label)]; multi-label: label is a tuple of 0/1, one per class
    splits: dict[str, list[tuple[str, int | tuple[int, ...]]]]
    fingerprint: str                                   # changes when any file changes
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # in-memory images
    bad: dict[str, str] = field(default_factory=dict, repr=False)  # key -> why it cannot be opened
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)
    multilabel: bool = False                           # a label file with rows of 0 or several labels

    def read(self, key: str) -> bytes | np.ndarray:
        if key in self.arrays:
            return self.arrays[key]
        # A broken link, a damaged ZIP member (bad CRC, broken deflate stream, encrypted) or a file
        # that vanished is the user's data problem: say which file as a DataError (which --skip-bad
        # skips), not a traceback. Found when listing or when reading, it fails here either way.
        if key in self.bad:
            raise DataError(f"{self.describe(key)}: {self.bad[key]}")
        try:
            if self._zip is not None:
                return self._read_member(key)
            return (Path(self.location) / key).read_bytes()
        except OSError as e:
            raise DataError(f"{self.describe(key)}: {why_unreadable(Path(self.location) / key, e)}") from None
        except (EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
            raise DataError(f"{self.describe(key)}: cannot read the file ({e})") from None

    def _read_member(self, key: str) -> bytes:
        info = self._zip.getinfo(key)
        size, packed = info.file_size, info.compress_size
        problem = None
        if info.compress_type not in _BOUNDED_METHODS:
            method = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}.get(info.compress_type)
            problem = f"compressed with {method or f'method {info.compress_type}'}, not stored or deflated"
        elif size > MAX_MEMBER_BYTES:
            problem = f"declares {size / 2**20:.0f} MiB uncompressed, over the {MAX_MEMBER_BYTES >> 20} MiB limit"
        elif size > RATIO_FROM_BYTES and size > MAX_RATIO * packed:
            problem = (f"declares {size / 2**20:.0f} MiB compressed {size // max(packed, 1)}:1, over "
                       f"{MAX_RATIO}:1: a decompression bomb?")
        if problem:
            raise DataError(f"{self.describe(key)}: {problem}{_EXTRACT}")
        # the header can lie: never take in more than the limit, whatever it declared
        with self._zip.open(info) as f:
            data = f.read(MAX_MEMBER_BYTES + 1)
        if len(data) > MAX_MEMBER_BYTES:
            raise DataError(f"{self.describe(key)}: holds over {MAX_MEMBER_BYTES >> 20} MiB{_EXTRACT}")
        return data

    def reopen(self) -> None:
        """Open the archive again, in a process forked from the one that opened it (data/decoding.py)."""
        if self._zip is not None:
            self._zip = zipfile.ZipFile(self.location)

    def describe(self, key: str) -> str:
        """A path a user can find: 'archive.zip:member' or the file's path."""
        if self._zip is not None or self.arrays:
            return f"{self.location}:{key}"
        return str(Path(self.location) / key)


def _is_junk(part: str) -> bool:
    return part.startswith(".") or part.lower() in _JUNK or part == "__MACOSX"


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _parts(rel: str) -> list[str]:
    return [p for p in rel.split("/") if p not in ("", ".")]


def _layout(location: str, files: list[tuple[str, str]], dirs: set[str],
            min_classes: int = 2) -> tuple[list[str], dict]:
    """From (key, relative path) pairs and directory paths, find classes and splits.

    Accepts root/<class>/... or root/<split>/<class>/..., under any chain of single wrapper folders
    (a ZIP of `cifar10/train/cat/1.jpg` works as is). Fewer than `min_classes` classes is an error:
    a classifier trained on one class is right on every test image and has learned nothing.
    """
    paths = [(k, _parts(rel)) for k, rel in files]
    paths = [(k, p) for k, p in paths if not any(_is_junk(x) for x in p)]
    dir_parts = [_parts(d) for d in dirs]
    dir_parts = [d for d in dir_parts if d and not any(_is_junk(x) for x in d)]
    prefix: list[str] = []
    while True:
        tops = {p[len(prefix)] for _, p in paths if len(p) > len(prefix) + 1}
        loose = [p for _, p in paths if len(p) == len(prefix) + 1]
        # a lone folder holding images and no folders is a class (the only one), not a wrapper
        only_images = (any(len(p) == len(prefix) + 2 and _is_image(p[-1]) for _, p in paths)
                       and not any(len(p) > len(prefix) + 2 for _, p in paths))
        if len(tops) == 1 and not loose and not only_images and next(iter(tops)).lower() not in SPLIT_NAMES:
            prefix.append(next(iter(tops)))
            continue
        break
    depth = len(prefix)
    inside = [(k, p[depth:]) for k, p in paths if p[:depth] == prefix]
    subdirs = [d[depth:] for d in dir_parts if d[:depth] == prefix and len(d) > depth]
    loose_images = [k for k, p in inside if len(p) == 1 and _is_image(p[0])]
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

    def enough(classes, *folders):
        if len(classes) < min_classes:
            raise DataError(f"{location}: the data has one class, {classes[0]} (folder "
                            f"{'/'.join([*prefix, *folders, classes[0]])}); a classifier needs at least "
                            "two: add a folder of images for each class")

    if not split_dirs:
        by_class = collect(inside, subdirs, location)
        classes = sorted(by_class)
        enough(classes)
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
    enough(classes, train_name)
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


def _stat(path: str, key: str, bad: dict[str, str]) -> tuple:
    """(key, size, mtime) for the fingerprint. A file that cannot be opened (a link that loops or
    leads nowhere) goes into `bad` with the reason, to fail when read like any unreadable image:
    an error naming it, or a skip under --skip-bad."""
    try:
        st = os.stat(path)
    except OSError as e:
        bad[key] = why_unreadable(Path(path), e)
        return key, -1, 0
    return key, st.st_size, st.st_mtime_ns


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _cannot_list(e: OSError):
    raise DataError(f"{e.filename}: cannot list the folder ({e.strerror or e})")


def open_folder(root: Path, min_classes: int = 2) -> Source:
    files, dirs, stats, bad = [], set(), [], {}
    # Linked folders are followed (a class kept elsewhere), except a link back to a folder it lies
    # in, which would lead round forever: each folder to walk maps to the folders above it.
    above = {os.fspath(root): {_identity(root)}}
    for dirpath, dirnames, filenames in os.walk(root, onerror=_cannot_list, followlinks=True):
        outer, walk = above.pop(dirpath), []
        for d in sorted(d for d in dirnames if not _is_junk(d)):
            full = os.path.join(dirpath, d)
            here = _identity(full)
            if here in outer:
                log(f"[yellow]{escape(full)}: symbolic link back to a folder above it; not followed[/]")
                continue
            above[full] = outer | {here}
            walk.append(d)
        dirnames[:] = walk
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        if rel_dir:
            dirs.add(rel_dir)
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            files.append((rel, rel))
            stats.append(_stat(os.path.join(dirpath, name), rel, bad))
    classes, splits = _layout(str(root), files, dirs, min_classes)
    return Source(str(root), classes, splits, _hash(stats), bad=bad)


def open_unlabeled(root: Path, classes: list[str]) -> Source:
    """Every image file under a folder, in any layout, as the split "all" with label -1: images
    that something else labels (a distillation teacher)."""
    keys = [p.relative_to(root).as_posix() for p in list_images(root)]
    bad: dict[str, str] = {}
    stats = [_stat(os.path.join(root, k), k, bad) for k in keys]
    return Source(str(root), list(classes), {"all": [(k, -1) for k in keys]}, _hash(stats), bad=bad)


def _escapes(rel: str) -> bool:
    """Whether a member, were it extracted, could land outside the folder it is extracted to."""
    return rel.startswith("/") or ".." in rel.split("/") or re.match(r"[A-Za-z]:", rel) is not None


def _shown(names: list[str], most: int = 10) -> str:
    """Member names on one line: control characters (a newline in a name) written as escapes."""
    shown = [re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", n) for n in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def open_zip(path: Path, min_classes: int = 2) -> Source:
    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable ZIP archive ({e})") from None
    files, dirs, escaping, seen = [], set(), [], set()
    for i in infos:
        rel = i.filename.replace("\\", "/")  # old Windows archivers write \ between folders
        if _escapes(rel):  # never a key, so never a path anywhere
            escaping.append(i.filename)
        elif rel.endswith("/"):
            dirs.add(rel.rstrip("/"))
        elif i.filename not in seen:  # a name stored twice reads as its last copy: one sample
            seen.add(i.filename)
            files.append((i.filename, rel))
            parts = rel.split("/")[:-1]  # folders implied by member paths
            dirs.update("/".join(parts[:n + 1]) for n in range(len(parts)))
    if escaping:
        log(f"[yellow]{escape(str(path))}: ignored {len(escaping)} member(s) whose path could leave the "
            f"folder they were extracted to (absolute, a drive, or ..): {escape(_shown(escaping))}[/]")
    try:
        classes, splits = _layout(str(path), files, dirs, min_classes)
    except DataError:
        zf.close()
        raise
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


def open_source(location: str, cache_dir: str | None = None, min_classes: int = 2) -> Source:
    """The data set at `location`. `min_classes=1` lets a one-class source through, for a caller
    that joins it to others (new classes for a trained run), never for training a classifier alone."""
    if location.lower() in ("cifar10", "cifar-10"):
        location = str(find_cifar10(cache_dir))
    path = Path(location).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data path does not exist" + " (a broken symbolic link)" * path.is_symlink())
    if path.is_dir():
        return open_folder(path, min_classes)
    if path.name.endswith((".tar.gz", ".tgz")):
        return open_cifar10_archive(path)
    if zipfile.is_zipfile(path):
        return open_zip(path, min_classes)
    raise DataError(f"{path}: not a folder, ZIP archive or CIFAR-10 python archive")
