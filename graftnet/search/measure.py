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
from ..export.runtime import evaluate_onnx, measure_latency, read_preprocess, to_input

CALIBRATION = ControlSettings.calibration   # training images, as `graft quantize`'s default
RETIME_ROUNDS = 5                           # rounds of the front's retiming (retime)
# Before each model's runs in turns: after its last run, the previous model's ONNX Runtime session
# keeps its worker threads spinning for work for a while, and on 2 cores they take a core from the
# next model. Measured (bench/turns.py, Lite0 at 160 px): timed in turns right after the other,
# int8 took 1.26x its time alone and fp32 1.18x; with this pause, 1.02x and 1.00x.
TURN_PAUSE_S = 0.05


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


def timed_in_turns(models: dict, batch_size: int = 1, rounds: int = RETIME_ROUNDS, repeats: int = 20,
                   pause: float = TURN_PAUSE_S) -> dict:
    """{key: [median ms of each round]}: every model timed again, all of them in turns, `rounds`
    rounds of `repeats` runs each. A trial's own timing is one moment of the machine, and the
    moments differ: on a 2-core CPU one network timed 0.49 ms in one trial and 0.90 ms in another,
    which put a slower network on the front in its place. Timed in turns, every model sees the same
    moments; `pause` seconds before each model's runs let the previous session's threads rest."""
    import statistics
    import time
    from ..export.runtime import session, timed_runs
    sessions = {k: session(path) for k, path in models.items()}   # opened once: loading is not timed
    medians: dict = {k: [] for k in models}
    for r in range(rounds):
        for k, sess in sessions.items():
            if len(sessions) > 1:
                time.sleep(pause)
            medians[k].append(statistics.median(timed_runs(sess, batch_size, repeats, warmup=3 if r == 0 else 1)))
    return medians


_RETIME_CHILD = ("import json, sys\nfrom graftnet.search.measure import retime\na = json.loads(sys.argv[1])\n"
                 "print(json.dumps(retime(a['models'], a['batch'], a['rounds'], a['repeats'])))")


def retime_apart(models: dict, batch_size: int = 1, rounds: int = RETIME_ROUNDS, repeats: int = 20) -> dict:
    """retime ({str key: path}) in a fresh Python process. A long-lived process times slower than
    it should: inside `graft auto`, after its search and fine-tuning, an int8 export timed 2.54 ms
    in turns (1.55 ms once, minutes before), and the same two files 1.68-1.76 ms in turns in a new
    process; a fresh process measuring and timing them alike gave 1.83 ms. The child costs about
    2 s of start-up."""
    import json
    import os
    import subprocess
    import sys
    from ..errors import GraftError
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    arg = json.dumps({"models": {k: str(v) for k, v in models.items()}, "batch": batch_size,
                      "rounds": rounds, "repeats": repeats})
    done = subprocess.run([sys.executable, "-c", _RETIME_CHILD, arg], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GraftError(f"timing {len(models)} model(s) in a separate process failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def retime(models: dict, batch_size: int = 1, rounds: int = RETIME_ROUNDS, repeats: int = 20) -> dict:
    """{key: median ms}: a model's latency the median of its rounds' medians (timed_in_turns)."""
    import statistics
    return {k: round(statistics.median(v), 4)
            for k, v in timed_in_turns(models, batch_size, rounds, repeats).items()}
