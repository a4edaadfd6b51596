"""fp32 against int8 ONNX models of one run: test accuracy, file size, latency at batch 1 and 64.

    python bench/quantize.py [--run RUN] [--per-class 200] [--size 128] [--features multi]
                             [--calibration 256] [--rounds 5]

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
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = ap.parse_args()
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
    for batch, repeats in ((1, 50), (64, 5)):
        rounds = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, path in models.items():
                rounds[name].append(measure_latency(path, batch, repeats, warmup=2)["median_ms"])
        for name, times in rounds.items():
            rows[name][f"b{batch}_ms"] = statistics.median(times)
            rows[name][f"b{batch}_ms_rounds"] = times
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
