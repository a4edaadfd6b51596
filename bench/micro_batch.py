"""Micro-batches on a CPU: one batch forward and backward in chunks, against the batch whole.

    python bench/micro_batch.py [--sizes 128 160 192 224] [--micros 0 64 32 16 8] [--reps 3] [--groups 5]

For each input size: images/s of `graft finetune`'s training step on the recipe's model (Lite0,
multi-stage features, head [256]; the top --groups backbone groups trained (all 8: the step of
pruning's recovery fine-tune), BatchNorm on running statistics, AdamW), a batch of 128 through the product's `train_one_epoch` with `micro_batch`
0 (whole) and each chunk size; and of inference (`predict_logits`, the validation and test passes)
on a batch of 256, whole and chunked. Variants interleaved, median of --reps after a warm-up, all
against the whole batch of the same run. Random pixels: speed does not depend on them. Writes
bench/results/micro_batch.json and prints markdown tables; the default (`chunk_size`) is marked.
`--precisions fp32 bf16` measures each chunk size with bf16 autocast too (rows "size bf16"), all
against fp32 whole batches: whether bf16 pays for training on a CPU with native bf16 instructions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import config  # noqa: E402
from graftnet.model import build_model  # noqa: E402
from graftnet.features import chunk_size  # noqa: E402
from graftnet.train.finetune import FineTuneMode, all_groups, set_trainable  # noqa: E402
from graftnet.train.loop import State, predict_logits, train_one_epoch  # noqa: E402

RECIPE = ROOT / "recipes" / "paper-cifar10.yaml"


def measure(size: int, micros: list[int], reps: int, batch: int, eval_batch: int, groups: int,
            precision: str = "fp32") -> dict:
    cfg = config.resolve(RECIPE, {"backbone.image_size": size, "backbone.precision": "fp32"})
    model, _ = build_model(cfg, [str(i) for i in range(10)])
    model = model.to(memory_format=torch.channels_last)
    set_trainable(model, all_groups(model), groups)
    module = FineTuneMode(model, "eval")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g)
    xe = torch.randn(eval_batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)

    def train_step(m):
        t0 = time.perf_counter()
        train_one_epoch(module, [(x, y)], 1, opt, State(), precision=precision, micro_batch=m)
        return time.perf_counter() - t0

    def infer(m):
        t0 = time.perf_counter()
        predict_logits(module, [(xe, y[:1].repeat(eval_batch))], precision, micro_batch=m)
        return time.perf_counter() - t0
    times = {("train", m): [] for m in micros} | {("infer", m): [] for m in micros}
    for kind, m in times:  # warm-up
        (train_step if kind == "train" else infer)(m)
    for _ in range(reps):
        for kind, m in times:
            times[kind, m].append((train_step if kind == "train" else infer)(m))
    out = {}
    for kind, n in (("train", batch), ("infer", eval_batch)):
        out[kind] = {str(m): n / statistics.median(times[kind, m]) for m in micros}
    out["default"] = chunk_size("cpu", size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 160, 192, 224])
    ap.add_argument("--micros", nargs="+", type=int, default=[0, 64, 32, 16, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--groups", type=int, default=5, help="top backbone groups trained")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "micro_batch.json"))
    args = ap.parse_args()
    results = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args), "sizes": {}}
    for size in args.sizes:
        for precision in args.precisions:  # rows "192" (fp32), "192 bf16"
            key = str(size) + ("" if precision == "fp32" else f" {precision}")
            print(f"{key} px", flush=True)
            results["sizes"][key] = measure(size, args.micros, args.reps, args.batch, args.eval_batch,
                                            args.groups, precision)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for kind, title, n in (("train", "training step", args.batch), ("infer", "inference", args.eval_batch)):
        print(f"\n| {title}, batch {n}, top {args.groups} groups trained, images/s | " + " | ".join(
            "whole" if m == 0 else f"chunks of {m}" for m in args.micros) + " |")
        print("|---|" + "---:|" * len(args.micros))
        for size, r in results["sizes"].items():
            base_row = size.split()[0] if "fp32" in args.precisions else size  # fp32 whole, if measured
            base = results["sizes"][base_row][kind]["0"]
            cells = [f"{r[kind][str(m)]:.1f}"
                     + ("" if (size, m) == (base_row, 0) else f" ({r[kind][str(m)] / base:.2f}x)")
                     + (" *" if m == r["default"] else "") for m in args.micros]
            print(f"| {size} px | " + " | ".join(cells) + " |")
    print(f"\n* the default on a CPU (train.micro_batch 0). Wrote {args.out}")


if __name__ == "__main__":
    main()
