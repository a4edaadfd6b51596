"""Which files are images: the extensions and the folder listing that sources (reading data sets)
and pixels (decoding, also in the torch-free ONNX predictor) both use. Below both, so neither has
to import the other."""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def list_images(target: str | Path) -> list[Path]:
    """The image itself, or every image file under a folder (sorted, hidden files left out)."""
    path = Path(target)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if not found:
            raise DataError(f"{path}: no image files found")
        return found
    raise DataError(f"{path}: no such file or folder")
