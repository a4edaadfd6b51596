"""Export a finished run's whole model (backbone + pool + head) to ONNX or TorchScript, and prove it.

The graph takes a normalised float32 NCHW batch (dynamic batch axis) and returns logits; the steps
before it (crop, resize, normalise) are written to preprocess.json beside the model so the file runs
without graftnet's training stack (see runtime.py). Every export is checked before it is kept:
ONNX Runtime's (or TorchScript's) logits on real images of the run must match PyTorch's.

The torch.export-based exporter (dynamo=True) is tried first: for EfficientNet-Lite0 it gives a
clean graph (49 Conv, 33 Clip, 4 ReduceMean, 2 Gemm: BatchNorm folded, TF "same" padding resolved
for the fixed image size) that runs ~1.5x faster in ORT than the legacy TorchScript-based exporter's,
which keeps the dynamic padding as Shape/Ceil/Pad chains. The forward hooks of "multi" features
trace fine under torch.export; the legacy exporter remains as a fallback.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import resolve
from ..data.images import ImageSet, config_splits, load_images, to_batch
from ..errors import GraftError
from ..io import atomic_write, atomic_write_json, remove_stale_temps
from ..model import ModelSpec, load_model
from ..progress import log
from .runtime import PREPROCESS_FILE, session, to_input

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
OPSET = 18


def load_run(run_dir: str | Path):
    """(model, spec, cfg) of a finished run, with a clear error for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GraftError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.yaml").is_file():
        raise GraftError(f"{run_dir}: not a graftnet run folder (no config.yaml)")
    model, spec = load_model(run_dir)
    return model, spec, resolve(run_dir / "config.yaml")


def preprocess_info(spec: ModelSpec, cfg, run_dir: Path) -> dict:
    """Everything a deployment needs to turn an image into the model's input, as plain JSON."""
    return {
        "format": "graftnet-export-1",
        "classes": list(spec.classes),
        "image_size": spec.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_name": "input",
        "output_name": "logits",
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "color": "gray" if cfg.data.grayscale else "RGB",  # gray: luminance copied to R, G and B
        "normalise": "x = (pixel / 255 - mean) / std, per channel, pixel in 0..255",
        "resize": ("centre square crop; shrink to image_size with PIL bicubic (reducing_gap=2) when "
                   "larger; then bilinear (half-pixel centres, align_corners=False) to image_size"),
        "output": ("logits; sigmoid gives each label's probability, and a label applies where it reaches "
                   "its threshold" if spec.multilabel else "logits; softmax gives class probabilities"),
        **({"multilabel": True, "thresholds": list(spec.thresholds)} if spec.multilabel else {}),
        "flip_average": bool(cfg.train.flip_views),  # average the logits of the horizontal mirror
        "backbone": spec.backbone, "timm_name": spec.timm_name, "weights_id": spec.weights_id,
        "run": str(run_dir),
    }


def check_images(spec: ModelSpec, cfg, n: int = 32) -> tuple[ImageSet, str]:
    """Up to n images of the run's test split (else its training split); generated noise images
    when the run's data is no longer where it was."""
    from ..data.labels import open_data
    try:
        source = open_data(cfg.data, cfg.cache_dir)
        splits = config_splits(source, cfg.data)
        name = "test" if splits["test"] else "train"
        samples = splits[name][:: max(1, len(splits[name]) // n)][:n]
        images = load_images(source, samples, spec.image_size, skip_bad=True, workers=1)
        if len(images):
            return images, f"{len(images)} {name} images of {cfg.data.path}"
    except (GraftError, OSError) as e:
        log(f"[yellow]run data not readable ({e}); checking the export on generated images[/]")
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, spec.image_size, spec.image_size), dtype=torch.uint8, generator=g)
            for _ in range(min(n, 8))]
    return ImageSet(imgs, torch.zeros(len(imgs), dtype=torch.long), [""] * len(imgs), spec.classes), \
        f"{len(imgs)} generated images"


def _export_onnx(model, x: torch.Tensor, path: str) -> str:
    """Write the ONNX graph to path; returns which exporter made it."""
    names = dict(input_names=["input"], output_names=["logits"], opset_version=OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        return "dynamo"
    except Exception as e:  # any torch.export limitation: fall back to the TorchScript-based one
        log(f"[yellow]torch.export-based ONNX export failed ({type(e).__name__}: {str(e)[:200]}); "
            "using the legacy exporter[/]")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, **names,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return "torchscript-onnx"


def compare(expected: np.ndarray, got: np.ndarray, what: str, rtol: float = 1e-3) -> float:
    """Max abs difference of two logit arrays; GraftError when above rtol x the logits' scale."""
    diff = float(np.abs(expected - got).max()) if expected.size else 0.0
    tol = rtol * max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    if not diff <= tol:  # also catches NaN
        raise GraftError(f"{what}: outputs differ from PyTorch's by {diff:.3g} (tolerance {tol:.3g}); "
                         "the export is not kept")
    return diff


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None,
               n_check: int = 32) -> dict:
    """Export run_dir's model to `out` (default RUN/export/model.onnx) with preprocess.json beside
    it. Returns {"path", "format", "exporter", "max_abs_diff", "checked_on", "size_bytes"}."""
    if fmt not in FORMATS:
        raise GraftError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    model, spec, cfg = load_run(run_dir)
    out = Path(out) if out else run_dir / "export" / FORMATS[fmt]
    images, checked_on = check_images(spec, cfg, n_check)
    x = to_batch(images.images, spec.image_size, spec.mean, spec.std)
    with torch.no_grad():
        expected = model(x).numpy()
    pre = preprocess_info(spec, cfg, run_dir)
    # the numpy preprocessing of the ORT predictor must give the tensor training gave
    prep_diff = compare(x.numpy(), to_input([im.numpy() for im in images.images], pre), "preprocessing")
    result = {"format": fmt}
    example = torch.cat([x, x])[:2]  # torch.export treats a batch of 1 as fixed, so trace with 2

    def write(tmp: str) -> None:
        if fmt == "onnx":
            result["exporter"] = _export_onnx(model, example, tmp)
            got = session(tmp).run(None, {"input": x.numpy()})[0]
        else:  # TorchScript is deprecated in torch 2.14 but still the one file libtorch (C++) loads
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(torch.jit.trace(model, example, check_trace=False), tmp)
                got = torch.jit.load(tmp)(x).numpy()  # a different batch size: the axis is dynamic
            result["exporter"] = "torch.jit.trace"
        result["max_abs_diff"] = compare(expected, got, str(out))

    atomic_write(out, write)
    atomic_write_json(out.parent / PREPROCESS_FILE, pre)
    remove_stale_temps(out.parent)  # of exports killed outright (SIGKILL): nothing of theirs ran
    result.update(path=str(out), checked_on=checked_on, preprocess_max_abs_diff=prep_diff,
                  size_bytes=out.stat().st_size)
    log(f"exported {out} ({result['exporter']}, {result['size_bytes'] / 1e6:.1f} MB); max |logit "
        f"difference| vs PyTorch {result['max_abs_diff']:.2e} on {checked_on}")
    _card(run_dir, out, result)
    return result


def _card(run_dir: Path, out: Path, result: dict) -> None:
    """The run's model card beside the exported file, with what the export adds: its format and
    checks, and (ONNX) its latency measured here, in ONNX Runtime, on this machine."""
    import platform
    from ..features import cpu_name
    from ..report.card import write_card
    latency = None
    if result["format"] == "onnx":
        from .runtime import measure_latency
        cpu = cpu_name() or platform.processor() or platform.machine()
        latency = {f"ONNX Runtime fp32, batch {b}, median of {r} ({cpu}, {os.cpu_count()} cores)":
                   measure_latency(out, batch_size=b, repeats=r)["median_ms"] for b, r in ((1, 20), (16, 5))}
    write_card(run_dir, dest=out.parent, latency=latency, exported={
        "file": f"`{out.name}` ({result['size_bytes'] / 1e6:.1f} MB, {result['format']}, exported with "
                f"{result['exporter']})",
        "checked": f"logits within {result['max_abs_diff']:.2e} of PyTorch's on {result['checked_on']}",
        "preprocessing": "`preprocess.json` beside it (resize, crop, mean and std: what `graft predict "
                         "--onnx` and other runtimes need)"})

