"""Image decoding and square cropping with PIL and numpy only (no torch).

Training (`images.py`) and the ONNX Runtime predictor (`graftnet/export/runtime.py`) both use these,
so an exported model sees exactly the pixels the trained one saw, in a process without torch.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from ..errors import DataError
from .sources import IMAGE_EXTENSIONS

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: grayscale X-rays, 16-bit scans, palettes and alpha (over white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def grayscale(img: Image.Image) -> Image.Image:
    """Luminance (ITU-R 601-2, PIL's "L") copied to three channels: backbones expect RGB input."""
    return img.convert("L").convert("RGB")


def decode(data: bytes | np.ndarray, where: str, gray: bool = False) -> Image.Image:
    """An RGB image from file bytes or an array; `gray`: R = G = B = the luminance."""
    img = _decode(data, where)
    return grayscale(img) if gray else img


def _decode(data: bytes | np.ndarray, where: str) -> Image.Image:
    if isinstance(data, np.ndarray):
        return Image.fromarray(data)
    if Path(where).suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{where}: not an image file (extension {Path(where).suffix or 'none'}); "
                        "remove it or pass --skip-bad")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # PIL raises many types for bad files
        reason = "truncated" if "truncated" in str(e) else f"cannot decode ({type(e).__name__}: {e})"
        raise DataError(f"{where}: corrupt or unreadable image: {reason}; "
                        "remove it or pass --skip-bad") from None


def square_array(img: Image.Image, max_size: int) -> np.ndarray:
    """Centre square crop, shrunk to max_size when larger (never enlarged here): uint8 3 x s x s."""
    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s > max_size:
        img = img.resize((max_size, max_size), Image.BICUBIC, reducing_gap=2.0)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


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
