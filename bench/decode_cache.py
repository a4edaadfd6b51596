"""The decoded-image cache: a run's image loading cold (decode + store) against warm (read back).

    python bench/decode_cache.py [--data ../shared/datasets/cifar10-jpeg.zip] [--photos 400]

Two data sets, each loaded twice in this process through `load_data` with a fresh cache folder:
the full CIFAR-10 copy (60,000 small JPEGs) at the default recipe's 128 px, and a generated folder
of large photos (1600x1200 JPEGs, smooth gradients plus noise, 4 classes) at 224 px: the kind of
input (phone photos, scans) where decoding is slowest. Writes bench/results/decode_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import config  # noqa: E402
from graftnet.train.inputs import load_data  # noqa: E402


def photos(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:1200, 0:1600]
        base = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, (x + y) % 256], -1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(d / f"{i:04d}.jpg", quality=90)
    return root


def timed_loads(data: str, size: int, cache: Path) -> dict:
    cfg = config.resolve(None, {"data.path": data, "backbone.image_size": size, "cache_dir": str(cache)})
    out = {}
    for name in ("cold", "warm"):
        t0 = time.perf_counter()
        _, sets = load_data(cfg)
        out[f"{name}_s"] = time.perf_counter() - t0
    out["images"] = sum(len(s) for s in sets.values())
    out["cache_bytes"] = sum(p.stat().st_size for p in (cache / "decoded").glob("*"))
    out["speedup"] = out["cold_s"] / out["warm_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--photos", type=int, default=400)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    results = {"command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_before": os.getloadavg()[0]}
    try:
        results["cifar10, 128 px"] = timed_loads(args.data, 128, work / "cache-cifar")
        folder = photos(work / "photos", args.photos)
        results[f"{args.photos} photos 1600x1200, 224 px"] = timed_loads(str(folder), 224, work / "cache-photos")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = os.getloadavg()[0]
    out = ROOT / "bench" / "results" / "decode_cache.json"
    out.write_text(json.dumps(results, indent=2))
    print("| data | images | cold: decode + store | warm: from the cache | speed-up | cache size |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"| {k} | {v['images']:,} | {v['cold_s']:.1f} s | {v['warm_s']:.2f} s | "
                  f"{v['speedup']:.0f}x | {v['cache_bytes'] / 1e6:.0f} MB |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
