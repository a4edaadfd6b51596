"""fp32 against int8 ONNX models of one run: test accuracy, file size, latency at batch 1 and 64.

    python bench/quantize.py [--run RUN] [--per-class 200] [--size 128] [--features multi]
                             [--calibration 256] [--rounds 5]
    python bench/quantize.py --run RUN --control [--max-drop 0.5] [--out bench/results/quantize_control.json]

--control: fp32, the former default int8 (MinMax, 7-bit weights) and the accuracy-controlled int8 of
`graft quantize --max-drop` (export/control.py), each scored on the run's validation split and its
whole test split, timed in turns; records the machine (CPU model, int8 flags), commit, load average
before and after, and the control's own wall time and the layers it kept fp32.

Without --run it first trains EfficientNet-Lite0 (frozen, cached features) on a CIFAR-10 slice.
Then: export (fp32 ONNX), static int8 (whole model, calibrated on training images) and dynamic int8
(head only), each scored on the run's test split with ONNX Runtime. Latency: the models are timed
in turns, `--rounds` times (each a median of repeats after warmup), so load from other processes
hits all of them alike; the table gives the median over rounds and the ratio to fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import config  # noqa: E402
from graftnet.export.exporter import export_run  # noqa: E402
from graftnet.export.quantize import calibration_images, quantize_onnx, quantize_run  # noqa: E402
from graftnet.export.runtime import evaluate_onnx, measure_latency, read_preprocess, to_input  # noqa: E402
from graftnet.model import load_model  # noqa: E402

# --explore: the alternatives to the default (u8s8, 7-bit weights), to show why it is the default
VARIANTS = {"int8 static, 8-bit weights (u8s8)": dict(reduce_range=False),
            "int8 static, u8u8": dict(reduce_range=False, weight_type="uint8")}
from graftnet.train.inputs import load_data  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402


def machine() -> dict:
    """CPU model, the flags that decide int8 speed, cores, ORT version."""
    import onnxruntime
    from graftnet.export.quantize import cpu_flags
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"cpu": model, "flags": {f: f in flags for f in wanted}, "cpu_threads": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__}


def git_state() -> dict:
    import subprocess
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain"))}


def control_bench(args) -> None:
    """fp32 / former default int8 / controlled int8: validation + full test accuracy, latency in turns."""
    from graftnet.export.control import ControlSettings, Validation, quantize_checked
    from graftnet.export.exporter import load_run
    from graftnet.export.quantize import held_out_images
    from graftnet.io import atomic_write_json
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    run = Path(args.run)
    _, spec, cfg = load_run(run)
    fp32 = run / "export" / "model.onnx"
    if not fp32.is_file():
        export_run(run)
    pre = read_preprocess(fp32)
    val = Validation.of_run(cfg, spec, pre, run)
    test = held_out_images(cfg, spec, "test")
    calib = to_input([im.numpy() for im in calibration_images(cfg, spec, args.calibration).images], pre)
    former = quantize_onnx(fp32, run / "export" / "bench-int8-7bit-minmax.onnx", "static", calib,
                           reduce_range=True)
    t0 = time.perf_counter()
    ctl = quantize_checked(run, ControlSettings(args.max_drop, calibration=args.calibration), validation=val)
    control_wall = time.perf_counter() - t0
    controlled = Path(ctl["path"] or ctl["rejected_path"])
    name = "int8 controlled (--max-drop %g)%s" % (args.max_drop, "" if ctl["accepted"] else ": REFUSED, fp32 kept")
    models = {"fp32": fp32, "int8 static, 7-bit weights, MinMax (former default)": former, name: controlled}
    controls = {name: (ctl, control_wall)}
    if args.also_7bit:  # the control as it runs on a CPU without VNNI (7-bit weights): its escalation
        t0 = time.perf_counter()
        ctl7 = quantize_checked(run, ControlSettings(args.max_drop, calibration=args.calibration, reduce_range=True),
                                run / "export" / "bench-7bit" / "model.int8.onnx", validation=val, record=False)
        name7 = "int8 controlled, 7-bit weights forced (--max-drop %g)%s" % (
            args.max_drop, "" if ctl7["accepted"] else ": REFUSED, fp32 kept")
        models[name7] = Path(ctl7["path"] or ctl7["rejected_path"])
        controls[name7] = (ctl7, time.perf_counter() - t0)
    rows = {}
    for label, path in models.items():
        rows[label] = {"val_accuracy": val.accuracy(path), "test_accuracy": evaluate_onnx(path, test)["accuracy"],
                       "size_mb": path.stat().st_size / 1e6}
    time_in_turns(models, rows, args.rounds)
    base = rows["fp32"]
    for r in rows.values():
        r["speedup_b1"], r["speedup_b64"] = base["b1_ms"] / r["b1_ms"], base["b64_ms"] / r["b64_ms"]
        r["val_drop_points"] = 100 * (base["val_accuracy"] - r["val_accuracy"])
        r["test_drop_points"] = 100 * (base["test_accuracy"] - r["test_accuracy"])
    result = {"command": " ".join(["python", "bench/quantize.py"] + sys.argv[1:]), "date": started,
              "machine": machine(), **git_state(), "run": str(run),
              "torch_test_accuracy": json.loads((run / "test_metrics.json").read_text())["accuracy"],
              "val_images": len(val.labels), "test_images": len(test), "rounds": args.rounds,
              "controls": {label: {"accepted": c["accepted"], "reason": c["reason"], "seconds": wall,
                                   "control_seconds": c["control_seconds"], "attempts": c["attempts"],
                                   "fp32_layers": c["fp32_layers"], "fp32_ends": c["fp32_ends"],
                                   "weights": c["weights"], "calibration": c["calibration"],
                                   "sensitivity_seconds": (c.get("sensitivity") or {}).get("seconds"),
                                   "latency_inside_control": c.get("latency")}
                           for label, (c, wall) in controls.items()},
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "models": rows}
    atomic_write_json(args.out, result)  # a temporary file, then a rename
    print(f"run {run}: {len(val.labels)} validation / {len(test)} test images")
    for label, (c, wall) in controls.items():
        print(f"{label}: {wall:.0f} s, {len(c['attempts'])} attempt(s), {len(c['fp32_layers'])} layer(s) kept "
              f"fp32 beyond the first conv and head; {c['reason'] or 'accepted'}")
    print("| model | val accuracy | test accuracy (drop) | size (MB) | batch 1 (ms) | batch 64 (ms) | speed-up b1 / b64 |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['val_accuracy']:.2%} | {r['test_accuracy']:.2%} ({-r['test_drop_points']:+.2f}) "
              f"| {r['size_mb']:.2f} | {r['b1_ms']:.2f} | {r['b64_ms']:.0f} | {r['speedup_b1']:.2f}x / {r['speedup_b64']:.2f}x |")


def time_in_turns(models: dict, rows: dict, n_rounds: int) -> None:
    """Batch 1 and 64 latency of every model into its row: the models timed in turns, `n_rounds`
    times, so load from other processes hits all of them alike; the median over rounds."""
    for batch, repeats in ((1, 50), (64, 5)):
        rounds = {label: [] for label in models}
        for _ in range(n_rounds):
            for label, path in models.items():
                rounds[label].append(measure_latency(path, batch, repeats, warmup=2)["median_ms"])
        for label, times in rounds.items():
            rows[label][f"b{batch}_ms"] = statistics.median(times)
            rows[label][f"b{batch}_ms_rounds"] = times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="an existing run folder (default: train one)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--features", default="multi")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--explore", action="store_true", help="also time u8s8 8-bit and u8u8 variants")
    ap.add_argument("--control", action="store_true", help="fp32 / former default / accuracy-controlled int8")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--also-7bit", action="store_true", help="with --control: the control with 7-bit weights "
                    "forced too (what a CPU without VNNI gets), to show its escalation")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.control:
        if not args.run:
            ap.error("--control needs --run RUN")
        args.out = args.out or str(ROOT / "bench" / "results" / "quantize_control.json")
        return control_bench(args)
    args.out = args.out or str(ROOT / "bench" / "results" / "quantize.json")
    run = Path(args.run) if args.run else train(config.resolve(None, {
        "data.path": args.data, "data.max_per_class": args.per_class, "backbone.image_size": args.size,
        "backbone.features": args.features, "train.epochs": args.epochs, "out": "/tmp/graftnet-bench"}))
    cfg = config.resolve(run / "config.yaml")
    t0 = time.perf_counter()
    exported = export_run(run)
    export_s = time.perf_counter() - t0
    models = {"fp32": Path(exported["path"])}
    quantized = {}
    for method in ("static", "dynamic"):
        t0 = time.perf_counter()
        out = run / "export" / ("model.int8.onnx" if method == "static" else "model.int8-dynamic.onnx")
        quantized[method] = {**quantize_run(run, method, args.calibration, out),
                             "seconds": time.perf_counter() - t0}
        models[f"int8 {method}"] = out
    if args.explore:
        _, spec = load_model(run)
        calib = to_input([im.numpy() for im in calibration_images(cfg, spec, args.calibration).images],
                         read_preprocess(models["fp32"]))
        for i, (name, kw) in enumerate(VARIANTS.items()):
            models[name] = quantize_onnx(models["fp32"], run / "export" / f"variant{i}.onnx", "static",
                                         calib, **kw)
    _, sets = load_data(cfg)
    rows = {name: {"accuracy": evaluate_onnx(path, sets["test"])["accuracy"],
                   "size_mb": path.stat().st_size / 1e6} for name, path in models.items()}
    time_in_turns(models, rows, args.rounds)
    base = rows["fp32"]
    for r in rows.values():
        r["speedup_b1"], r["speedup_b64"] = base["b1_ms"] / r["b1_ms"], base["b64_ms"] / r["b64_ms"]
    torch_acc = json.loads((run / "test_metrics.json").read_text())["accuracy"]
    result = {"command": " ".join(["python", "bench/quantize.py"] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "run": str(run), "test_images": len(sets["test"]),
              "torch_test_accuracy": torch_acc, "export": {**exported, "seconds": export_s},
              "quantize": quantized, "cpu_threads": os.cpu_count(), "load_average": os.getloadavg(),
              "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"run {run}: {len(sets['test'])} test images; PyTorch test accuracy {torch_acc:.4f}")
    print("| model | test accuracy | size (MB) | batch 1 (ms) | batch 64 (ms) | speed-up b1 / b64 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['accuracy']:.2%} | {r['size_mb']:.2f} | {r['b1_ms']:.2f} | {r['b64_ms']:.0f} "
              f"| {r['speedup_b1']:.2f}x / {r['speedup_b64']:.2f}x |")


if __name__ == "__main__":
    main()
