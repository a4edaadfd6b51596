"""Which files are images: the extensions and the folder listing that sources (reading data sets)
and pixels (decoding, also in the torch-free ONNX predictor) both use. Below both, so neither has
to import the other."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def list_images(target: str | Path) -> list[Path]:
    """The image itself, or every image file under a folder (sorted, hidden files left out)."""
    path = Path(target)
    if path.is_file():
        return [path]
    if path.is_dir():
        # a folder called "album.png" is no image; a broken link is listed, to be reported by name
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith(".") and not p.is_dir())
        if not found:
            raise DataError(f"{path}: no image files found")
        return found
    try:
        os.stat(path)
    except OSError as e:
        if path.is_symlink():
            raise DataError(f"{path}: {why_unreadable(path, e)}") from None
    raise DataError(f"{path}: no such file or folder")


def why_unreadable(path: Path, e: OSError) -> str:
    """Why a listed file cannot be opened, in words: the OS's own ("Too many levels of symbolic
    links") do not say that the name is a link, nor where it leads."""
    if e.errno == errno.ELOOP:
        return "symbolic link loops (it leads back to itself)"
    if e.errno == errno.ENOENT and path.is_symlink():
        return f"symbolic link to a missing file ({os.readlink(path)})"
    if e.errno == errno.EISDIR:
        return "a folder, not a file"
    return f"cannot read the file ({e.strerror or e})"
