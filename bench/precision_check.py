"""Do bf16 autocast and channels-last change what the frozen backbone computes?

    python bench/precision_check.py [--per-class 30] [--size 128]

On a CIFAR-10 slice: features of EfficientNet-Lite0 in fp32 (contiguous, the reference), fp32
channels-last, and bf16 channels-last. Reports the cosine similarity of each to the reference, the
time per image, and the test accuracy of the same head (trained on reference train features)
when it is fed each variant's test features: a change beyond noise shows up as lost agreement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import config  # noqa: E402
from graftnet.model import build_model  # noqa: E402
from graftnet.features import compute_features  # noqa: E402
from graftnet.train.inputs import load_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    cfg = config.resolve(ROOT / "recipes/paper-cifar10.yaml", {
        "data.path": args.data, "data.max_per_class": args.per_class, "data.val_fraction": 0.0,
        "backbone.image_size": args.size})
    source, sets = load_data(cfg)
    model, spec = build_model(cfg, source.classes)
    variants = {"fp32 contiguous": ("fp32", False), "fp32 channels-last": ("fp32", True),
                "bf16 channels-last": ("bf16", True)}
    feats, seconds = {}, {}
    for name, (precision, cl) in variants.items():
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        t0 = time.perf_counter()
        feats[name] = {s: compute_features(m, sets[s], spec.image_size, spec.mean, spec.std, 64,
                                           precision, cl).float() for s in ("train", "test")}
        seconds[name] = (time.perf_counter() - t0) / (len(sets["train"]) + len(sets["test"]))
    ref = feats["fp32 contiguous"]
    # a linear head on reference features, the same for every variant
    torch.manual_seed(0)
    x, y = ref["train"], sets["train"].labels
    mu, sd = x.mean(0), x.std(0) + 1e-6
    head = torch.nn.Linear(x.shape[1], len(source.classes))
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head((x - mu) / sd), y).backward()
        opt.step()
    rows = {}
    with torch.no_grad():
        ref_pred = head((ref["test"] - mu) / sd).argmax(1)
        for name, f in feats.items():
            pred = head((f["test"] - mu) / sd).argmax(1)
            rows[name] = {
                "cosine_to_fp32": F.cosine_similarity(f["test"], ref["test"], dim=1).mean().item(),
                "test_accuracy": (pred == sets["test"].labels).float().mean().item(),
                "agreement_with_fp32": (pred == ref_pred).float().mean().item(),
                "ms_per_image": 1000 * seconds[name]}
    result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "train": len(sets["train"]), "test": len(sets["test"]), "size": args.size, "variants": rows}
    out = ROOT / "bench" / "results" / "precision_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| variant | cosine to fp32 | test acc (same head) | agreement with fp32 | ms / image |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cosine_to_fp32']:.5f} | {100 * r['test_accuracy']:.1f}% | "
              f"{100 * r['agreement_with_fp32']:.1f}% | {r['ms_per_image']:.1f} |")


if __name__ == "__main__":
    main()
