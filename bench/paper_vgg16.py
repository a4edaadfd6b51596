"""The paper's experiment exactly (VGG16 frozen at 32 px), beside graftnet's default, on all of CIFAR-10.

    graft weights fetch vgg16      # once
    python bench/paper_vgg16.py [--seeds 0 1 2]

Runs recipes/paper-cifar10-vgg16.yaml over several head seeds (features cached after the first),
the same recipe at 64 px, and recipes/paper-cifar10.yaml (EfficientNet-Lite0) in the same process,
sharing bench/paper_protocol.py's feature cache when it is there. Writes bench/results/paper_vgg16.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from paper_protocol import mean_spread, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-per-class", type=int, default=None)
    args = ap.parse_args()
    work = ROOT / "bench" / ".work"
    base = {"data.path": args.data, "out": str(work / "runs-vgg16"), "cache_dir": str(work / "cache"),
            "data.max_per_class": args.max_per_class}
    variants = [("vgg16_32px", "recipes/paper-cifar10-vgg16.yaml", {}),
                ("vgg16_64px", "recipes/paper-cifar10-vgg16.yaml", {"backbone.image_size": 64}),
                ("lite0_default", "recipes/paper-cifar10.yaml", {})]
    results = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M")}
    for label, recipe, extra in variants:
        accs, walls = [], []
        for seed in args.seeds:
            wall, m, _ = run(recipe, {**base, **extra, "train.seed": seed, "name": f"{label}-s{seed}"})
            accs.append(m["accuracy"])
            walls.append(wall)
            print(f"{label} seed {seed}: acc {m['accuracy']:.4f} wall {wall:.1f}s", flush=True)
        results[label] = {"accuracy": accs, "wall": walls}
    out = ROOT / "bench" / "results" / "paper_vgg16.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| variant | test accuracy | wall, first seed (cold cache) / later seeds |\n|---|---|---|")
    for label, _, _ in variants:
        r = results[label]
        later = ", ".join(f"{w:.0f}" for w in r["wall"][1:])
        print(f"| {label} | {mean_spread(r['accuracy'])} | {r['wall'][0]:.0f} s / {later} s |")


if __name__ == "__main__":
    main()
