"""Channel ranking, BatchNorm recalibration, QAT and transfer sets, measured on bench/compression.py's
base model.

    python bench/compression.py          # once: trains bench/.work/compression/runs/base
    python bench/compression_extras.py [--parts sensitivity qat distill] [--transfer-max 8000]

Accuracy only (timings come from bench/compression.py, on a quiet machine), all on the same
CIFAR-10 slice as the base model (200/class: 1,800 train, 200 validation, 2,000 test):
  sensitivity  structured pruning of the base without recovery: channel ranking by Taylor
               importance or weight magnitude, per layer or global, at several amounts; validation
               accuracy right after pruning and after BatchNorm recalibration (always applied here,
               to show what it does), MACs against the base's
  qat          static int8 (ONNX Runtime) of the base after post-training quantization, and after
               1 epoch of quantization-aware training
  distill      the MobileNetV2 96 px student of compression.py: no teacher, distilled, and
               distilled with a transfer set of unlabeled CIFAR-10 training images outside the slice
Writes bench/results/compression_extras.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import config  # noqa: E402
from graftnet.compress.distill import DistillSettings, distill  # noqa: E402
from graftnet.compress.prune import (PruneSettings, Run, channel_pruner, count, recalibrate_bn,  # noqa: E402
                                     taylor_gradients)
from graftnet.compress.qat import QatSettings, qat_run  # noqa: E402
from graftnet.export.quantize import quantize_run  # noqa: E402
from graftnet.export.runtime import evaluate_onnx  # noqa: E402

WORK = ROOT / "bench" / ".work" / "compression"
RECIPE = ROOT / "recipes" / "paper-cifar10.yaml"


def sensitivity(run: Run) -> list[dict]:
    size = run.spec.image_size
    base_macs, _ = count(run.model, size)
    rows = []
    for importance in ("magnitude", "taylor"):
        for scope in ("per layer", "global"):
            for amount in (0.1, 0.3):
                model = copy.deepcopy(run.model)
                pruner = channel_pruner(model, size, PruneSettings(amount=amount, importance=importance,
                                                                   global_pruning=scope == "global", round_to=8))
                if importance == "taylor":
                    taylor_gradients(run, model, 256, 0)
                pruner.step()
                model.zero_grad(set_to_none=True)
                model.eval()
                pruned = run.accuracy(model, "val")
                recalibrate_bn(model, run.batches("train", 64, torch.Generator().manual_seed(0)), 2000)
                model.eval()
                macs, _ = count(model, size)
                rows.append({"importance": importance, "scope": scope, "amount": amount,
                             "macs_ratio": base_macs / macs, "val_pruned": pruned,
                             "val_recalibrated": run.accuracy(model, "val")})
                print(rows[-1], flush=True)
    return rows


def qat(run: Run, base: Path) -> dict:
    ptq = quantize_run(base)
    out = qat_run(base, QatSettings(epochs=1), out=str(WORK / "runs"), name="qat-extras")
    report = json.loads((out / "qat.json").read_text())
    return {"fp32": run.accuracy(run.model), "int8_ptq": evaluate_onnx(ptq["path"], run.sets["test"])["accuracy"],
            "fp32_after_qat": report["fp32_after_qat"], "int8_after_qat": report["int8_after_qat"]}


def students(base: Path, data: str, per_class: int, transfer_max: int) -> dict:
    common = {"data.path": data, "data.max_per_class": per_class, "out": str(WORK / "runs"),
              "cache_dir": str(WORK / "cache"), "backbone.name": "mobilenetv2", "backbone.image_size": 96,
              "backbone.features": "last"}
    out = {}
    for name, label, settings in (("no-teacher", "no teacher", DistillSettings(None, 4.0, 0.0)),
                                  ("distilled", "distilled", DistillSettings(str(base), 4.0, 0.7)),
                                  ("transfer", f"distilled + {transfer_max} unlabeled images",
                                   DistillSettings(str(base), 4.0, 0.7, data, transfer_max))):
        run_dir = distill(config.resolve(RECIPE, {**common, "name": f"extras-{name}"}), settings)
        info = json.loads((run_dir / "distill.json").read_text())
        out[label] = {"accuracy": info["student_test_acc"], "teacher": info["teacher_test_acc"],
                      "transfer_images": info["transfer_images"]}
        print(label, out[label], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--per-class", type=int, default=200, help="the slice compression.py used")
    ap.add_argument("--parts", nargs="+", default=["sensitivity", "qat", "distill"])
    ap.add_argument("--transfer-max", type=int, default=8000)
    args = ap.parse_args()
    base = WORK / "runs" / "base"
    if not (base / "model.safetensors").is_file():
        sys.exit(f"{base} is missing: run bench/compression.py first")
    run = Run(base)
    dest = ROOT / "bench" / "results" / "compression_extras.json"
    result = json.loads(dest.read_text()) if dest.is_file() else {}
    result.update({"command": " ".join(["python bench/compression_extras.py", *sys.argv[1:]]),
                   "date": time.strftime("%Y-%m-%d %H:%M"), "base": str(base), "n_val": len(run.sets["val"]),
                   "n_test": len(run.sets["test"])})
    for part in args.parts:
        result[part] = {"sensitivity": lambda: sensitivity(run), "qat": lambda: qat(run, base),
                        "distill": lambda: students(base, args.data, args.per_class, args.transfer_max)}[part]()
        dest.write_text(json.dumps(result, indent=2))
    if "sensitivity" in result:
        print("\n| importance | scope | amount | MACs ratio | val after pruning | + BatchNorm recalibrated |")
        print("|---|---|---:|---:|---:|---:|")
        for r in result["sensitivity"]:
            print(f"| {r['importance']} | {r['scope']} | {r['amount']:.0%} | {r['macs_ratio']:.2f}x | "
                  f"{100 * r['val_pruned']:.1f}% | {100 * r['val_recalibrated']:.1f}% |")
    if "qat" in result:
        print("\n", json.dumps(result["qat"], indent=1))
    if "distill" in result:
        print("\n", json.dumps(result["distill"], indent=1))


if __name__ == "__main__":
    main()
