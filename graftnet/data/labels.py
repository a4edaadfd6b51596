"""Images listed in a label file: `--data DIR --labels labels.csv`.

The file (comma-, semicolon- or tab-separated) has a header and one row per image: a column with the image's path relative to DIR and
either one label column (several labels in a cell split by the separator, `cat|dog`) or one 0/1
column per label. Every row is checked before anything is decoded, and a problem is one line that
names the file, the row (its line in the file, the header being row 1) and what is wrong. A data
set whose every row holds exactly one label is an ordinary single-label source, the same as class
folders; otherwise it is multi-label: each sample's label is a 0/1 tuple, one entry per class.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

from ..errors import DataError
from .files import why_unreadable
from .sources import SPLIT_NAMES, Source, open_source

FILE_COLUMNS = ("file", "filename", "image", "path", "filepath", "image_path")
LABEL_COLUMNS = ("label", "labels", "tags", "class", "classes")
SPLIT_COLUMN = "split"
_TRUE, _FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
assert set(_SPLITS) == set(SPLIT_NAMES)  # the same names as split folders


def open_data(data, cache_dir: str | None = None, min_classes: int = 2) -> Source:
    """The source a DataConfig describes: `data.path` alone, or with `data.labels` the images its
    label file lists under `data.path`."""
    if not getattr(data, "labels", None):
        return open_source(data.path, cache_dir, min_classes)
    return open_label_file(Path(data.path).expanduser(), data.labels, file_column=data.file_column,
                           label_column=data.label_column, label_columns=data.label_columns,
                           separator=data.label_separator, split_column=data.split_column)


def _find(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file() and not p.is_absolute() and (root / p).is_file():
        return root / p  # a name relative to the data folder: labels.csv beside the images
    if not p.is_file():
        raise DataError(f"{p}: label file not found" + ("" if p.exists() or p.is_absolute() else f" (nor under {root})"))
    return p


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet's "CSV UTF-8"
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file (save the label file as CSV UTF-8)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the label file ({e.strerror or e})") from None
    # the header says which: a comma, else a semicolon (spreadsheets in locales with decimal
    # commas write those) or a tab
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = next((d for d in (",", ";", "\t") if d in first), ",")
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except csv.Error as e:
        raise DataError(f"{path} row {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: empty; expected a header (e.g. file,label) and one row per image")
    return rows


def _column(header: list[str], name: str | None, defaults: tuple[str, ...], path: Path, what: str) -> int | None:
    lowered = [h.strip().lower() for h in header]
    if name is not None:
        if name.strip().lower() not in lowered:
            raise DataError(f"{path}: no column {name!r} ({what}); the header has {', '.join(header)}")
        return lowered.index(name.strip().lower())
    return next((lowered.index(d) for d in defaults if d in lowered), None)


def _key(cell: str, where: str) -> str:
    rel = cell.strip().replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        raise DataError(f"{where}: the file name is empty")
    if rel.startswith("/") or ".." in parts or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise DataError(f"{where}: file {cell.strip()} is not a path inside the data folder (absolute or ..)")
    return "/".join(parts)


def open_label_file(root: Path, labels: str, file_column: str | None = None, label_column: str | None = None,
                    label_columns: str | None = None, separator: str = "|",
                    split_column: str | None = None) -> Source:
    if not root.is_dir():
        raise DataError(f"{root}: --labels needs --data to be the folder the label file's paths are under")
    path = _find(labels, root)
    (_, header), *rows = _read_rows(path)
    fcol = _column(header, file_column, FILE_COLUMNS, path, "data.file_column")
    if fcol is None:
        raise DataError(f"{path}: no file column (looked for {', '.join(FILE_COLUMNS)}; the header has "
                        f"{', '.join(header)}); name it with --set data.file_column=NAME")
    scol = _column(header, split_column, (SPLIT_COLUMN,), path, "data.split_column")
    if label_columns:  # one 0/1 column per label, named
        lcol, indicator = None, [_column(header, n, (), path, "data.label_columns")
                                 for n in label_columns.split(",") if n.strip()]
    else:
        lcol = _column(header, label_column, LABEL_COLUMNS, path, "data.label_column")
        # without a label column, every other column is a 0/1 column of its own label
        indicator = [] if lcol is not None else [i for i in range(len(header)) if i not in (fcol, scol)]
    if lcol is None and len(indicator) < 1:
        raise DataError(f"{path}: no label column (looked for {', '.join(LABEL_COLUMNS)}) and no other "
                        "columns to read as one 0/1 column per label")
    classes = [header[i].strip() for i in indicator] if lcol is None else []
    if lcol is None and (len(set(classes)) < len(classes) or not all(classes)):
        raise DataError(f"{path}: label columns need distinct, non-empty names in the header ({', '.join(classes)})")
    entries, seen = [], {}  # (row, key, set of label names, split)
    for line, row in rows:
        where = f"{path.name} row {line}"
        if len(row) < len(header):
            raise DataError(f"{where}: {len(row)} column(s), the header has {len(header)}")
        key = _key(row[fcol], where)
        if key in seen:
            raise DataError(f"{where}: file {key} is listed again (first in row {seen[key]})")
        seen[key] = line
        if lcol is not None:
            cell = row[lcol].strip()
            if not cell:
                raise DataError(f"{where}: no label for {key}")
            names = list(dict.fromkeys(n.strip() for n in cell.split(separator)))  # cat|cat: once
            if not all(names):
                raise DataError(f"{where}: empty label in {cell!r} (separator {separator!r})")
        else:
            names = []
            for i in indicator:
                value = row[i].strip().lower()
                if value not in _TRUE | _FALSE:
                    raise DataError(f"{where}: column {header[i].strip()}: {row[i].strip()!r} is not 0 or 1")
                if value in _TRUE:
                    names.append(header[i].strip())
        split = "all"
        if scol is not None:
            split = _SPLITS.get(row[scol].strip().lower())
            if split is None:
                raise DataError(f"{where}: split {row[scol].strip()!r} is not one of train, val, test")
        entries.append((line, key, names, split))
    if not entries:
        raise DataError(f"{path}: no rows below the header")
    return _source(root, path, entries, classes, lcol is None)


def _source(root: Path, path: Path, entries: list, classes: list[str], indicator: bool) -> Source:
    if not indicator:
        classes = sorted({n for _, _, names, _ in entries for n in names})
        train = {n for _, _, names, split in entries for n in names if split in ("train", "all")}
        for line, _, names, split in entries:  # a label only val or test have: no model can learn it
            unknown = [n for n in names if n not in train]
            if unknown and train:
                raise DataError(f"{path.name} row {line}: label {unknown[0]} appears in no training row")
    if len(classes) < 2:
        raise DataError(f"{path}: the data has one label ({', '.join(classes) or 'none'}); a classifier "
                        "needs at least two")
    multilabel = indicator and any(len(names) != 1 for _, _, names, _ in entries) or \
        any(len(names) > 1 for _, _, names, _ in entries)
    stats, bad, splits = [hashlib.sha256(path.read_bytes()).hexdigest()], {}, {}
    for line, key, names, split in entries:
        full = root / key
        try:
            st = os.stat(full)
        except FileNotFoundError:
            if not full.is_symlink():
                raise DataError(f"{path.name} row {line}: file {key} not found under {root}") from None
            bad[key] = why_unreadable(full, FileNotFoundError(2, "missing"))
            st = None
        except OSError as e:  # a link that loops: unreadable, like any image (--skip-bad skips it)
            bad[key], st = why_unreadable(full, e), None
        stats.append((key, st.st_size, st.st_mtime_ns) if st else (key, -1, 0))
        label = tuple(int(c in names) for c in classes) if multilabel else classes.index(names[0])
        splits.setdefault(split, []).append((key, label))
    if "all" not in splits and "train" not in splits:
        raise DataError(f"{path}: the split column names no training rows (train)")
    h = hashlib.sha256()
    for item in stats:
        h.update(repr(item).encode())
    # the label file is part of the data: other labels, another fingerprint
    return Source(str(root), classes, splits, h.hexdigest()[:16], bad=bad, multilabel=multilabel)
