"""Issue 4's pruning target on more data: a pruned model at least 1.5x faster within 2 points.

    python bench/prune_target.py [--per-class 0] [--size 64] [--ft-epochs 1] [--amount 0.3]
                                 [--steps 2] [--prune-epochs 1] [--channels all|inner] [--base RUN]
                                 [--out bench/results/prune_target.json]

The compression benchmark's slice (1,800 training images) is too small for a pruned Lite0 to recover on. This
benchmark gives recovery the whole CIFAR-10 training split (`--per-class 0`), paying for it with a
smaller input size so that it fits this CPU: the base is `recipes/paper-cifar10.yaml` (Lite0) at
`--size` px, head on frozen features then `--ft-epochs` of `graft finetune`; the pruned model is
`graft prune --method structured --amount A --steps S --finetune-epochs E --distill 0.7
--round-to 8 --channels C` of it (`--base` reuses an earlier run's base). Both are exported to
ONNX and scored by ONNX Runtime on the whole test split; latency is the median ORT time at batch 1
and 64, the two models timed one after the other.
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
from graftnet.compress.prune import PruneSettings, prune_run  # noqa: E402
from graftnet.export.exporter import export_run  # noqa: E402
from graftnet.train.inputs import load_data  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402

import compression  # noqa: E402  (bench/compression.py: the same scoring and table)

RECIPE = ROOT / "recipes" / "paper-cifar10.yaml"


def score(path: Path, test) -> dict:
    row = compression.score(path, test, repeats=(50, 10))
    del row["logits"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--per-class", type=int, default=0, help="training images per class (0: all)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prune-epochs", type=int, default=1, help="recovery epochs after each step")
    ap.add_argument("--channels", choices=["all", "inner"], default="all",
                    help="inner: keep the residual stream's widths (graft prune --channels)")
    ap.add_argument("--base", help="an earlier run of this benchmark's base: prune it instead of training one")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune_target.json"))
    args = ap.parse_args()
    work = ROOT / "bench" / ".work" / "prune_target"
    name = f"pruned-{args.channels}{round(args.amount * 100)}"
    if not args.base:
        shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    overrides = {"data.path": args.data, "out": str(work / "runs"), "cache_dir": str(work / "cache"),
                 "backbone.image_size": args.size, "finetune.epochs": args.ft_epochs, "name": "base"}
    if args.per_class:
        overrides["data.max_per_class"] = args.per_class
    load = [os.getloadavg()[0]]
    t0 = time.time()
    base = Path(args.base) if args.base else train(config.resolve(RECIPE, overrides))
    t_base = time.time() - t0
    settings = PruneSettings(amount=args.amount, steps=args.steps, finetune_epochs=args.prune_epochs,
                             distill=0.7, round_to=8, channels=args.channels)
    pruned = prune_run(base, settings, out=str(work / "runs"), name=name)
    t_prune = time.time() - t0 - t_base
    load.append(os.getloadavg()[0])
    _, sets = load_data(config.resolve(base / "config.yaml"))
    test = sets["test"]
    label = f"structured {round(args.amount * 100)}% ({args.channels} channels)"
    rows = {"fp32 base": score(Path(export_run(base)["path"]), test),
            label: score(Path(export_run(pruned)["path"]), test)}
    load.append(os.getloadavg()[0])
    prune_info = json.loads((pruned / "prune.json").read_text())
    out = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "args": vars(args), "n_test": len(test), "n_train": len(sets["train"]),
           "seconds": {"base": round(t_base), "prune": round(t_prune)},
           "load_avg_1min": {"start": load[0], "after_training": load[1], "after_timing": load[2]},
           "prune": {k: prune_info[k] for k in ("before", "after", "steps")},
           "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{len(test)} test images, {len(sets['train'])} training images, {args.size} px\n")
    print(compression.table(rows, rows["fp32 base"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
