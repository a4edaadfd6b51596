"""Image decoding and square cropping with PIL and numpy only (no torch).

Training (`images.py`) and the ONNX Runtime predictor (`graftnet/export/runtime.py`) both use these,
so an exported model sees exactly the pixels the trained one saw, in a process without torch.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import DataError
from .files import IMAGE_EXTENSIONS, list_images, why_unreadable  # noqa: F401 (list_images: still importable here)

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
    # The messages say what is wrong with which file; how to go on (--skip-bad) is for the caller
    # to add, since not every command skips (predict always goes on past a bad file).
    if isinstance(data, np.ndarray):
        return Image.fromarray(data)
    if Path(where).suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{where}: not an image file (extension {Path(where).suffix or 'none'})")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{where}: corrupt or unreadable image: {unreadable_reason(e)}") from None


def unreadable_reason(e: Exception) -> str:
    """Why PIL could not read an image, in words a user can act on."""
    if isinstance(e, UnidentifiedImageError):  # its text is "cannot identify image file <BytesIO ...>"
        return "not in any image format PIL reads"
    if "truncated" in str(e):
        return "truncated"
    # PIL names the in-memory buffer it read, which means nothing to the user: the path is named
    return f"cannot decode ({type(e).__name__}: {re.sub(r' ?<[^<>]* object at 0x[0-9a-fA-F]+>', '', str(e))})"


def square_array(img: Image.Image, max_size: int) -> np.ndarray:
    """Centre square crop, shrunk to max_size when larger (never enlarged here): uint8 3 x s x s."""
    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s > max_size:
        img = img.resize((max_size, max_size), Image.BICUBIC, reducing_gap=2.0)
    # a copy, always: PIL's buffer is read-only, and a 1x1 image's transpose is contiguous already,
    # so ascontiguousarray would hand it on and torch.from_numpy warn about it
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def read_squares(paths: list[Path], size: int, gray: bool = False) -> list[np.ndarray | str]:
    """Each file as a uint8 square (`square_array`), or, for a file that cannot be read or decoded,
    the reason (text naming the file): one bad file in a folder of thousands must not cost the
    others their predictions."""
    out: list[np.ndarray | str] = []
    for p in paths:
        try:
            out.append(square_array(decode(p.read_bytes(), str(p), gray), size))
        except OSError as e:
            out.append(f"{p}: {why_unreadable(p, e)}")
        except DataError as e:
            out.append(str(e))
    return out


PREDICT_CHUNK = 512  # files a prediction decodes at a time: memory holds a chunk, not the folder


def predict_files(target: str | Path, paths: list[Path], size: int, gray: bool, classify) -> list[dict]:
    """One record per file of `paths`, in order, decoded and classified a chunk at a time:
    `classify(paths, squares)` gives the records of the files that decoded; the others get
    {"file", "error"}. Raises as `readable` does when nothing at all could be read."""
    results, seen = [], []
    for start in range(0, len(paths), PREDICT_CHUNK):
        part = paths[start:start + PREDICT_CHUNK]
        decoded = read_squares(part, size, gray)
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        found = classify([part[i] for i in ok], [decoded[i] for i in ok]) if ok else []
        results += with_unreadable(part, decoded, found)
        seen += [d if isinstance(d, str) else True for d in decoded]  # reasons; decoded squares dropped
    readable(target, seen)
    return results


def readable(target: str | Path, decoded: list) -> list[int]:
    """Indices of the files `read_squares` decoded. A single file that did not decode, or a
    folder where none did, is an error: there is nothing to predict."""
    bad = [d for d in decoded if isinstance(d, str)]
    if bad and (Path(target).is_file() or len(bad) == len(decoded)):
        raise DataError(bad[0] if len(bad) == 1 else
                        f"{target}: none of the {len(bad)} image files could be read; the first: {bad[0]}")
    return [i for i, d in enumerate(decoded) if not isinstance(d, str)]


def with_unreadable(paths: list[Path], decoded: list, results: list[dict]) -> list[dict]:
    """Prediction records for every file in order: `results` for the files that decoded, and
    {"file", "error"} for those that did not."""
    found = iter(results)
    return [{"file": str(p), "error": d.removeprefix(f"{p}: ")} if isinstance(d, str) else next(found)
            for p, d in zip(paths, decoded)]
