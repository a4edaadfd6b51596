"""Does a head train faster in bf16 on cached features, at the same accuracy? (backbone.precision
auto: features.native_bf16's `dense` rule)

    python bench/head_precision.py [--cache-dir DIR] [--stages steps,accuracy] [--out bench/results/head_precision.json]

steps     one optimizer step of heads on cached-feature widths (1,280: Lite0's final map; 3,088:
          its `blocks` features) x hidden widths x batch sizes, fp32 and bf16 autocast alternating
          in one process (best of 2 rounds of 30 steps each), on 1 thread (a search worker's share
          of this 2-core CPU) and on every core
accuracy  the paper recipe's head (128 px) and the search benchmark's best head (160 px, `blocks`,
          1,024 wide, 20 epochs, batch 512) trained on CIFAR-10's cached features with head steps
          in fp32 and in bf16, everything else equal: validation and test accuracy, median epoch seconds.
          The features come from --cache-dir (computed there first when missing).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from equivalence import atomic_write_json, git_state, loadavg, machine  # noqa: E402

SEARCH_BEST = {"backbone.image_size": 160, "backbone.features": "blocks", "head.hidden": [1024],
               "head.dropout": 0.3236, "head.activation": "gelu", "train.optimizer": "adamw",
               "train.lr": 4.69e-4, "train.weight_decay": 5.86e-6, "train.label_smoothing": 0.002,
               "train.batch_size": 512, "train.epochs": 20}


def step_ms(fin: int, hidden: list[int], batch: int, bf16: bool, n: int = 30) -> float:
    torch.manual_seed(0)
    x, y = torch.randn(batch, fin), torch.randint(0, 10, (batch,))
    layers, width = [], fin
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU(), torch.nn.Dropout(0.5)]
        width = h
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(5):
        step()
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n * 1000


def stage_steps(a) -> dict:
    rows = []
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        for fin in (1280, 3088):
            for hidden in ([256], [1024], [512, 512]):
                for batch in (128, 256, 512):
                    fp32 = bf16 = float("inf")
                    for _ in range(2):  # alternating: both see the same load
                        fp32 = min(fp32, step_ms(fin, hidden, batch, False))
                        bf16 = min(bf16, step_ms(fin, hidden, batch, True))
                    rows.append({"threads": threads, "features": fin, "hidden": hidden, "batch": batch,
                                 "fp32_ms": round(fp32, 2), "bf16_ms": round(bf16, 2), "speedup": round(fp32 / bf16, 2)})
                    print(rows[-1], flush=True)
    speedups = sorted(r["speedup"] for r in rows)
    return {"rows": rows, "median_speedup": speedups[len(speedups) // 2], "min_speedup": speedups[0],
            "max_speedup": speedups[-1]}


def train_once(overrides: dict, cache: Path, work: Path, name: str, dense_bf16: bool) -> dict:
    """One run in this process; the fp32 arm turns off only the dense rule, so the cached features
    (computed with the inference precision) are the same file in both arms."""
    from graftnet import config, features
    from graftnet.train.pipeline import train
    original = features.native_bf16
    if not dense_bf16:
        features.native_bf16 = lambda device="cpu", training=False, dense=False: original(device, training)
    try:
        cfg = config.resolve(ROOT / "recipes" / "paper-cifar10.yaml",
                             {**overrides, "data.path": "cifar10", "cache_dir": str(cache), "out": str(work), "name": name})
        start = time.monotonic()
        result = train(cfg)
        seconds = time.monotonic() - start
    finally:
        features.native_bf16 = original
    history = result.history
    epochs = sorted(r["seconds"] for r in history)
    metrics = json.loads((Path(result.run_dir) / "test_metrics.json").read_text())
    # the median epoch: a fit's total would carry any pause the shared cores had meanwhile
    return {"val_acc": round(history[-1]["val_acc"], 4), "test_acc": metrics["accuracy"],
            "median_epoch_seconds": round(epochs[len(epochs) // 2], 2),
            "epoch_seconds": [round(r["seconds"], 2) for r in history], "run_seconds": round(seconds, 1)}


def stage_accuracy(a) -> dict:
    import shutil
    work = Path(a.work)
    out = {}
    for label, overrides in (("paper recipe, 128 px", {}), ("search best, 160 px blocks", SEARCH_BEST)):
        for dense in (False, True):
            name = f"{'bf16' if dense else 'fp32'}-{label.split(',')[0].replace(' ', '-')}"
            shutil.rmtree(work / name, ignore_errors=True)
            out.setdefault(label, {})["bf16" if dense else "fp32"] = train_once(overrides, Path(a.cache_dir), work, name, dense)
            print(label, out[label], flush=True)
        pair = out[label]
        pair["epoch_speedup"] = round(pair["fp32"]["median_epoch_seconds"] / pair["bf16"]["median_epoch_seconds"], 2)
        pair["test_points_bf16_minus_fp32"] = round(100 * (pair["bf16"]["test_acc"] - pair["fp32"]["test_acc"]), 2)
    return out


STAGES = {"steps": stage_steps, "accuracy": stage_accuracy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=str(ROOT / "bench" / ".work" / "head_precision" / "cache"))
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "head_precision" / "runs"))
    p.add_argument("--stages", default="steps,accuracy")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "head_precision.json"))
    a = p.parse_args()
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("stages", {})
    results.update(command="python bench/head_precision.py " + " ".join(sys.argv[1:]), machine=machine(),
                   tree=git_state(ROOT))
    for stage in a.stages.split(","):
        started = dt.datetime.now().isoformat(timespec="seconds")
        results["stages"][stage] = {**STAGES[stage](a), "started": started, "loadavg_end": loadavg(),
                                    "commit": git_state(ROOT)["commit"]}
        atomic_write_json(out, results)


if __name__ == "__main__":
    main()
