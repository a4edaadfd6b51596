"""The paper's protocol on the full CIFAR-10 copy: graftnet's default path against the naive path.

    python bench/paper_protocol.py [--data ../shared/datasets/cifar10-jpeg.zip] [--seeds 0 1 2]

Measures, in one process:
  1. graftnet's default (recipes/paper-cifar10.yaml): wall time of the whole run with an empty
     feature cache, then test accuracy over several head seeds (features reused from the cache);
  2. the same without flipped views, and at the paper's own 32 px input;
  3. the naive path (fp32, contiguous tensors, the frozen backbone run on every batch of every epoch,
     validation every epoch), timed for one full epoch and scaled to 10;
  4. backbone images/s in fp32 / bf16, contiguous / channels-last.
Writes bench/results/paper_protocol.json and prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import backbones, config  # noqa: E402
from graftnet.features import autocast, native_bf16  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402


def run(recipe: str, overrides: dict) -> tuple[float, dict, list[dict]]:
    cfg = config.resolve(ROOT / recipe, overrides)
    t0 = time.perf_counter()
    run_dir = train(cfg)
    wall = time.perf_counter() - t0
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return wall, metrics, history


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}%"
    return f"{100 * statistics.mean(values):.2f}% ± {100 * statistics.stdev(values):.2f}"


@torch.no_grad()
def throughput(size: int, batch: int = 64, reps: int = 3) -> dict:
    model, _ = backbones.create(backbones.get_spec("efficientnet_lite0"))
    model.eval()
    out = {}
    for precision in ("fp32", "bf16"):
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            m = model.to(memory_format=fmt)
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
            with autocast(precision):
                m.forward_features(x)  # warm-up: oneDNN builds its kernels
                t0 = time.perf_counter()
                for _ in range(reps):
                    m.forward_features(x)
            out[f"{precision}/{layout}"] = batch * reps / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-per-class", type=int, default=None, help="slice, for a quick trial")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    work = ROOT / "bench" / ".work"
    shutil.rmtree(work, ignore_errors=True)
    base = {"data.path": args.data, "out": str(work / "runs"), "cache_dir": str(work / "cache"),
            "data.max_per_class": args.max_per_class}
    results: dict = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                     "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                     "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
                     "cores": os.cpu_count(), "native_bf16": native_bf16(), "torch": torch.__version__}
    print(json.dumps(results), flush=True)

    # 1. graftnet default, cold cache, then other seeds on cached features
    accs, walls = [], []
    for i, seed in enumerate(args.seeds):
        wall, m, hist = run("recipes/paper-cifar10.yaml", {**base, "train.seed": seed, "name": f"default-s{seed}"})
        accs.append(m["accuracy"])
        walls.append(wall)
        print(f"default seed {seed}: acc {m['accuracy']:.4f} wall {wall:.1f}s (cache {'cold' if i == 0 else 'warm'})", flush=True)
    results["default"] = {"accuracy": accs, "wall_cold": walls[0], "wall_warm": walls[1:],
                          "head_epochs_seconds": sum(r["seconds"] for r in hist)}

    # 2. ablations on the same cache: no flipped views; final features only; the paper's 32 px
    for label, extra in [("flip_views", {"train.flip_views": True}),
                         ("last_features", {"backbone.features": "last"}),
                         ("flatten_32px", {"backbone.image_size": 32, "backbone.features": "last",
                                           "head.pool": "flatten"}),
                         ("multi_64px", {"backbone.image_size": 64})]:
        accs, walls = [], []
        for seed in args.seeds:
            wall, m, _ = run("recipes/paper-cifar10.yaml", {**base, **extra, "train.seed": seed,
                                                            "name": f"{label}-s{seed}"})
            accs.append(m["accuracy"])
            walls.append(wall)
            print(f"{label} seed {seed}: acc {m['accuracy']:.4f} wall {wall:.1f}s", flush=True)
        results[label] = {"accuracy": accs, "wall": walls}

    # 3. naive path: one real epoch (train + validation) with the backbone on every batch, scaled
    if not args.skip_naive:
        wall, m, hist = run("recipes/paper-cifar10.yaml", {
            **base, "train.epochs": 1, "train.cache_features": False,
            "backbone.precision": "fp32", "backbone.channels_last": False, "name": "naive"})
        epoch = hist[0]["seconds"]
        results["naive"] = {"wall_1_epoch_run": wall, "epoch_seconds": epoch,
                            "wall_10_epochs_estimate": wall + 9 * epoch, "accuracy_1_epoch": m["accuracy"]}
        print(f"naive: 1-epoch run {wall:.1f}s, epoch {epoch:.1f}s -> 10 epochs {wall + 9 * epoch:.1f}s", flush=True)

    # 4. backbone throughput
    results["throughput_128"] = throughput(128)
    results["throughput_32"] = throughput(32, batch=256)
    print(json.dumps(results["throughput_128"]), json.dumps(results["throughput_32"]), flush=True)

    out = ROOT / "bench" / "results" / "paper_protocol.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(r: dict) -> None:
    print("\n| variant | test accuracy (mean ± sd over seeds) |\n|---|---|")
    for key, label in [("default", "recipe: Lite0 128 px, multi-stage features"),
                       ("flip_views", "same + flipped views cached, flip TTA"),
                       ("last_features", "final features only"),
                       ("multi_64px", "recipe at 64 px"), ("flatten_32px", "paper's 32 px input, Flatten head")]:
        if key in r:
            print(f"| {label} | {mean_spread(r[key]['accuracy'])} |")
    if "naive" in r:
        g, n = r["default"]["wall_cold"], r["naive"]["wall_10_epochs_estimate"]
        print(f"\ngraftnet default, whole 10-epoch run (cold cache): {g:.0f} s; naive 10 epochs: {n:.0f} s; "
              f"ratio {n / g:.1f}x")
        t = r["throughput_128"]
        print("backbone img/s at 128 px: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))


if __name__ == "__main__":
    main()
