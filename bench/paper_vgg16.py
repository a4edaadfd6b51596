"""The paper's experiment exactly (VGG16 frozen at 32 px), beside graftnet's default, on all of CIFAR-10.

    graft weights fetch vgg16      # once
    python bench/paper_vgg16.py [--seeds 0 1 2] [--variants vgg16_32px lite0_default ...]

Variants, all in one process (head seeds share cached features; the first seed of a variant pays
for the backbone pass unless bench/.work/cache already holds it):
  vgg16_32px        recipes/paper-cifar10-vgg16.yaml (the paper's setup)
  lite0_default     recipes/paper-cifar10.yaml (graftnet's default, EfficientNet-Lite0 at 128 px)
  vgg16_aug         recipes/paper-cifar10-vgg16-aug.yaml: the paper's augmentation on the fly
                    (the frozen backbone runs on every augmented batch, as in the paper)
  vgg16_aug_views4  the same with --cache-views 4 (4 augmented views cached per image and seed)
  vgg16_64px        the paper's recipe at 64 px
Writes bench/results/paper_vgg16.json after every run (a killed benchmark keeps what it measured)
and prints a markdown table. Each run records the 1-minute load average before and after it, so
a timing taken while something else shared the cores shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from paper_protocol import mean_spread, run  # noqa: E402

VARIANTS = {
    "vgg16_32px": ("recipes/paper-cifar10-vgg16.yaml", {}),
    "lite0_default": ("recipes/paper-cifar10.yaml", {}),
    "vgg16_aug": ("recipes/paper-cifar10-vgg16-aug.yaml", {}),
    "vgg16_aug_views4": ("recipes/paper-cifar10-vgg16-aug.yaml", {"train.cache_views": 4}),
    "vgg16_64px": ("recipes/paper-cifar10-vgg16.yaml", {"backbone.image_size": 64}),
}


def table(results: dict) -> str:
    rows = ["| variant | test accuracy | seeds | wall per seed (s) |", "|---|---|---|---|"]
    for label in VARIANTS:
        if label in results:
            r = results[label]
            rows.append(f"| {label} | {mean_spread(r['accuracy'])} | {', '.join(map(str, r['seeds']))} | "
                        f"{', '.join(f'{w:.0f}' for w in r['wall'])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "paper_vgg16.json"))
    args = ap.parse_args()
    work = ROOT / "bench" / ".work"
    base = {"data.path": args.data, "out": str(work / "runs-vgg16"), "cache_dir": str(work / "cache"),
            "data.max_per_class": args.max_per_class}
    results = {"command": " ".join(["python bench/paper_vgg16.py"] + sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for label in args.variants:
        recipe, extra = VARIANTS[label]
        r = results[label] = {"recipe": recipe, "overrides": extra, "seeds": [], "accuracy": [], "wall": [],
                              "load_before": [], "load_after": []}
        for seed in args.seeds:
            load = os.getloadavg()[0]
            wall, m, _ = run(recipe, {**base, **extra, "train.seed": seed, "name": f"{label}-s{seed}"})
            for key, value in (("seeds", seed), ("accuracy", m["accuracy"]), ("wall", wall),
                               ("load_before", load), ("load_after", os.getloadavg()[0])):
                r[key].append(value)
            print(f"{label} seed {seed}: acc {m['accuracy']:.4f} wall {wall:.1f}s", flush=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(out)
    print("\n" + table(results))


if __name__ == "__main__":
    main()
