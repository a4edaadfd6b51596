"""Issue 4's table in one run: a fine-tuned EfficientNet-Lite0 and what compression makes of it.

    python bench/compression.py [--per-class 200] [--size 128] [--ft-epochs 1]

On a CIFAR-10 slice, in one process: the base model (recipe head on the frozen backbone, then
`graft finetune`), static int8 of it, structured pruning of 30% and 50% of its channels (2 steps,
BatchNorm recalibrated, --prune-epochs recovery epochs each, distilling from the unpruned model,
channel counts rounded to multiples of 8), static int8 after quantization-aware training, a
MobileNetV2 student at 96 px distilled from it against the same student without a teacher and
the same student distilled with a transfer set (unlabeled CIFAR-10 training images outside the
slice), and a two-member ensemble (the base + a frozen Lite0 at 96 px). Every row is exported to
ONNX and scored by ONNX Runtime on the same test images; latency is the median ORT time of batch 1 and batch 64 with ORT's default threads, rows
timed one after another. An ensemble's latency is its members' sum (they run in turn).
Writes bench/results/compression.json and prints the markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import config  # noqa: E402
from graftnet.compress.distill import DistillSettings, distill  # noqa: E402
from graftnet.compress.prune import PruneSettings, prune_run  # noqa: E402
from graftnet.compress.qat import QatSettings, qat_run  # noqa: E402
from graftnet.export.exporter import export_run  # noqa: E402
from graftnet.export.quantize import quantize_run  # noqa: E402
from graftnet.export.runtime import OnnxClassifier, measure_latency, softmax  # noqa: E402
from graftnet.train.inputs import load_data  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402

RECIPE = ROOT / "recipes" / "paper-cifar10.yaml"


def score(path: Path, test, repeats: tuple[int, int] = (30, 5)) -> dict:
    """ORT's test accuracy, file size and median latency at batch 1 and 64 (`repeats` timings each)."""
    clf = OnnxClassifier(path)
    logits = clf.logits([im.numpy() for im in test.images], 64)
    b1, b64 = measure_latency(path, 1, repeats=repeats[0]), measure_latency(path, 64, repeats=repeats[1])
    return {"logits": logits, "accuracy": float((logits.argmax(1) == test.labels.numpy()).mean()),
            "size_mb": path.stat().st_size / 1e6, "b1_ms": b1["median_ms"], "b64_ms": b64["median_ms"]}


def table(rows: dict, base: dict) -> str:
    """The markdown table for BENCHMARKS.md, speed-ups against the `base` row."""
    lines = ["| model | test accuracy | ONNX size | batch 1 | batch 64 | speed-up b1 / b64 |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {100 * r['accuracy']:.2f}% | {r['size_mb']:.1f} MB | {r['b1_ms']:.2f} ms | "
              f"{r['b64_ms']:.0f} ms | {base['b1_ms'] / r['b1_ms']:.2f}x / {base['b64_ms'] / r['b64_ms']:.2f}x |"
              for k, r in rows.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--prune-epochs", type=int, default=1, help="recovery epochs after each of 2 pruning steps")
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--transfer-max", type=int, default=8000,
                    help="unlabeled CIFAR-10 training images (outside the slice) for the transfer-set student")
    args = ap.parse_args()
    work = ROOT / "bench" / ".work" / "compression"
    shutil.rmtree(work, ignore_errors=True)
    common = {"data.path": args.data, "data.max_per_class": args.per_class, "out": str(work / "runs"),
              "cache_dir": str(work / "cache")}
    t0 = time.time()
    base = train(config.resolve(RECIPE, {**common, "backbone.image_size": args.size, "name": "base",
                                         "finetune.epochs": args.ft_epochs}))
    second = train(config.resolve(RECIPE, {**common, "backbone.image_size": 96, "name": "lite0-96"}))
    students = {}
    transfer = f"MobileNetV2 96 px, distilled + {args.transfer_max} unlabeled images"
    for label, teacher, extra in (("MobileNetV2 96 px, distilled", str(base), {}),
                                  ("MobileNetV2 96 px, no teacher", None, {}),
                                  (transfer, str(base), {"transfer": args.data, "transfer_max": args.transfer_max})):
        name = "transfer" if extra else label.split(",")[1].strip().replace(" ", "-")
        cfg = config.resolve(RECIPE, {**common, "backbone.name": "mobilenetv2", "backbone.image_size": 96,
                                      "backbone.features": "last", "name": name})
        students[label] = distill(cfg, DistillSettings(teacher, 4.0, 0.7 if teacher else 0.0, **extra))
    pruned = {f"structured {round(a * 100)}% channels": prune_run(
        base, PruneSettings(amount=a, steps=2, finetune_epochs=args.prune_epochs, distill=0.7, round_to=8),
        out=str(work / "runs"), name=f"pruned{round(a * 100)}") for a in (0.3, 0.5)}
    qat = qat_run(base, QatSettings(epochs=args.qat_epochs), out=str(work / "runs"), name="qat")
    print(f"models trained in {time.time() - t0:.0f} s; exporting and timing", flush=True)

    files = {"fp32 (fine-tuned Lite0)": Path(export_run(base)["path"]),
             "int8 static (ORT, QDQ)": Path(quantize_run(base)["path"]),
             f"int8 static after {args.qat_epochs} QAT epoch(s)": qat / "export" / "model.int8.onnx"}
    files.update({k: Path(export_run(v)["path"]) for k, v in pruned.items()})
    files.update({k: Path(export_run(v)["path"]) for k, v in students.items()})
    member2 = Path(export_run(second)["path"])
    _, sets = load_data(config.resolve(base / "config.yaml"))
    test = sets["test"]
    rows = {k: score(p, test) for k, p in files.items()}
    m2 = score(member2, test)
    ens = (softmax(rows["fp32 (fine-tuned Lite0)"]["logits"]) + softmax(m2["logits"])) / 2
    rows["ensemble: fp32 base + Lite0 96 px (equal weights)"] = {
        "accuracy": float((ens.argmax(1) == test.labels.numpy()).mean()),
        "size_mb": rows["fp32 (fine-tuned Lite0)"]["size_mb"] + m2["size_mb"],
        "b1_ms": rows["fp32 (fine-tuned Lite0)"]["b1_ms"] + m2["b1_ms"],
        "b64_ms": rows["fp32 (fine-tuned Lite0)"]["b64_ms"] + m2["b64_ms"]}
    base_row = rows["fp32 (fine-tuned Lite0)"]
    out = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "args": vars(args), "n_test": len(test), "second_member_accuracy": m2["accuracy"],
           "rows": {k: {kk: vv for kk, vv in v.items() if kk != "logits"} for k, v in rows.items()}}
    dest = ROOT / "bench" / "results" / "compression.json"
    dest.write_text(json.dumps(out, indent=2))
    print(f"\n{len(test)} test images, {args.per_class}/class slice, base at {args.size} px\n")
    print(table(rows, base_row))
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
