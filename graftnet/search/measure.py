"""What a trial's model costs where it runs: exported to ONNX (int8 when the trial asks), timed with
ONNX Runtime on this CPU, and sized; an int8 model's validation accuracy is its own, measured on the
validation split (never the test split: trials are chosen on validation alone).

An int8 trial is quantized as the accuracy control's first attempt (export/control.py): MinMax
calibration on the same number of training images and the weight format this CPU runs fast and
accurately (8-bit weights with VNNI/AMX, 7-bit without). The control's later steps (other
calibrations, sensitive layers in fp32) are not run per trial: each costs a quantization and a
validation pass, several times a trial's own measurement; `graft quantize` runs them on the run
that is kept. The trial's validation accuracy int8 vs its torch model's shows what it would need."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..export.exporter import export_run, load_run
from ..export.control import ControlSettings
from ..export.quantize import calibration_images, held_out_images, quantize_onnx, weight_reduce_range
from ..export.runtime import evaluate_onnx, measure_latency, read_preprocess, timed_in_turns, to_input

CALIBRATION = ControlSettings.calibration   # training images, as `graft quantize`'s default
RETIME_ROUNDS = 5                           # rounds of the front's retiming (retime)


def measure_run(run: Path, int8: bool, batch_size: int = 1) -> dict:
    """{"latency_ms", "latency_ms_b64", "size_mb", "int8", and with int8 "val_acc_int8" and
    "int8_reduce_range" (the weight format)} of the run's exported model. Latency is the median of
    ORT runs on one batch (the model alone)."""
    run = Path(run)
    fp32 = run / "export" / "model.onnx"
    if not fp32.is_file():
        export_run(run, "onnx", fp32)
    path, out = fp32, {"int8": bool(int8)}
    if int8:
        _, spec, cfg = load_run(run)
        pre = read_preprocess(fp32)
        calib = calibration_images(cfg, spec, CALIBRATION, cfg.train.seed)
        reduce_range = weight_reduce_range()   # the control's choice for this CPU
        path = quantize_onnx(fp32, fp32.with_name("model.int8.onnx"), "static",
                             to_input([im.numpy() for im in calib.images], pre), reduce_range=reduce_range,
                             calibrate_method="minmax")
        out["int8_reduce_range"] = reduce_range
        val = held_out_images(cfg, spec, "val")
        out["val_acc_int8"] = float(evaluate_onnx(path, val)["accuracy"]) if val is not None else float("nan")
    out["latency_ms"] = measure_latency(path, batch_size=batch_size)["median_ms"]
    if batch_size != 64:
        out["latency_ms_b64"] = measure_latency(path, batch_size=64, repeats=5)["median_ms"]
    out["size_mb"] = path.stat().st_size / 1e6
    out["model"] = str(path)
    return {k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in out.items()}


def retime(models: dict, batch_size: int = 1, rounds: int = RETIME_ROUNDS, repeats: int = 20) -> dict:
    """{key: median ms}: a model's latency the median of its rounds' medians (timed_in_turns)."""
    import statistics
    return {k: round(statistics.median(v), 4)
            for k, v in timed_in_turns(models, batch_size, rounds, repeats).items()}
