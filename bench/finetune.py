"""Fine-tuning and fast-training benchmark (issue 3), in one process.

    python bench/finetune.py [--data ../shared/datasets/cifar10-jpeg.zip] [--per-class 500]
        [--size 128] [--ft-epochs 2] [--aug-per-class 300] [--skip PART ...]

Parts (each skippable):
  throughput  training images/s of one fine-tuning step (forward + backward + AdamW, all groups
              unfrozen) for fp32 contiguous, fp32 channels-last, bf16 autocast, torch.compile;
              ratios against fp32 contiguous measured in this run, repeats interleaved.
  finetune    the paper recipe (Lite0, multi features, head [256], dropout 0.5, 10 head epochs on
              cached features) frozen only, against the same run followed by `graft finetune`
              (all groups, discriminative rates, cosine, flip augmentation): test accuracy, wall time.
  augment     the paper's augmentation + dropout on the frozen backbone: on the fly (backbone on
              every augmented batch) against K cached views, and no augmentation; accuracy, time.
  groups      (with --groups N ...) fine-tuning steps with only the top N backbone groups unfrozen.
Slices (--per-class) keep it within a few hours on a 2-core CPU; the full set (--per-class 0)
needs a GPU, where training and the throughput part run by themselves.
Writes bench/results/finetune.json and prints markdown tables for BENCHMARKS.md.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import backbones, config  # noqa: E402
from graftnet.features import autocast  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402

RECIPE = ROOT / "recipes" / "paper-cifar10.yaml"


def step_throughput(size: int, batch: int, reps: int) -> dict[str, float]:
    """Median images/s of training steps, per variant; variants interleaved so drift hits all. On
    the GPU when there is one (timed with synchronisation), else on the CPU."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base, _ = backbones.create(backbones.get_spec("efficientnet_lite0"))
    head = torch.nn.Linear(base.num_features, 10)
    base, head = base.to(dev), head.to(dev)
    variants = {"fp32 contiguous": ("fp32", False, False), "fp32 channels-last": ("fp32", True, False),
                "bf16 autocast, channels-last": ("bf16", True, False),
                "torch.compile, fp32 channels-last": ("fp32", True, True)}
    steps, times = {}, {k: [] for k in variants}
    for name, (precision, cl, compiled) in variants.items():
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = torch.nn.Sequential(base, head).to(memory_format=fmt)
        opt = torch.optim.AdamW(model.parameters(), 1e-5)
        fwd = torch.compile(model) if compiled else model
        x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=dev)

        def step(fwd=fwd, opt=opt, precision=precision, x=x, y=y):
            with autocast(precision, dev):
                logits = fwd(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()  # warm-up (compilation for the compiled variant)
        print(f"  {name}: warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        steps[name] = step
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def group_throughput(size: int, batch: int, reps: int, tops: list[int]) -> dict[str, float]:
    """Median images/s of `graft finetune`'s training step (the grafted model of the recipe, BatchNorm
    in eval mode, AdamW on what trains) with the top N backbone groups unfrozen, variants interleaved.
    Frozen groups at the bottom need no backward pass, and at 128 px and up they are the widest maps."""
    from graftnet.model import build_model
    from graftnet.train.finetune import FineTuneMode, all_groups, set_trainable
    cfg = config.resolve(RECIPE, {"backbone.image_size": size, "backbone.precision": "fp32"})
    model, _ = build_model(cfg, [str(i) for i in range(10)])
    model = model.to(memory_format=torch.channels_last)
    groups = all_groups(model)
    n_backbone = len(groups) - 1
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    steps, times = {}, {}
    for top in tops:
        top = min(top, n_backbone)
        name = f"top {top} of {n_backbone} groups" + (" (all)" if top == n_backbone else "")

        def step(top=top):
            set_trainable(model, groups, top)
            module = FineTuneMode(model, "eval").train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-5)
            t0 = time.perf_counter()
            loss = F.cross_entropy(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0
        step()  # warm-up
        steps[name], times[name] = step, []
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(step())
    return {k: batch / statistics.median(v) for k, v in times.items()}


def _speed_table(title: str, rates: dict[str, float]) -> None:
    """Markdown rows of images/s, each against the first variant (the baseline of the same run)."""
    first, base = next(iter(rates.items()))
    print(f"\n| {title} | images/s | vs {first} |\n|---|---:|---:|")
    for k, v in rates.items():
        print(f"| {k} | {v:.1f} | {v / base:.2f}x |")


def run(overrides: dict) -> dict:
    cfg = config.resolve(RECIPE, overrides)
    t0 = time.perf_counter()
    run_dir = train(cfg)
    wall = time.perf_counter() - t0
    m = json.loads((run_dir / "test_metrics.json").read_text())
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy": m["accuracy"], "n_test": m["n"], "wall_s": wall, "run": str(run_dir),
            "epoch_seconds": [r["seconds"] for r in history]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--per-class", type=int, default=500,
                    help="training slice per class (finetune); 0: the whole data set")
    ap.add_argument("--aug-per-class", type=int, default=300, help="training slice per class (augment)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="finetune.lr (its default)")
    ap.add_argument("--ft-bn", nargs="+", default=["eval", "frozen"], help="finetune.bn variants")
    ap.add_argument("--ft-ema", nargs="+", type=float, default=[0.0],
                    help="finetune.ema variants, crossed with --ft-bn (0: no weight average)")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="throughput batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--groups", nargs="*", type=int, default=[],
                    help="also time fine-tuning steps with the top N backbone groups unfrozen, e.g. 8 5 4")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "finetune", "augment"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"),
                    help="results file (a GPU run: another name, so the CPU results stay)")
    args = ap.parse_args()
    work = ROOT / "bench" / ".work" / "finetune"
    shutil.rmtree(work, ignore_errors=True)
    common = {"data.path": args.data, "out": str(work / "runs"), "cache_dir": str(work / "cache"),
              "backbone.image_size": args.size}
    results: dict = {"command": " ".join([sys.executable, *sys.argv]), "machine": platform.processor()
                     or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
    if "throughput" not in args.skip:
        print("throughput", flush=True)
        tp = step_throughput(args.size, args.batch, args.reps)
        results["throughput"] = tp
        _speed_table(f"training step, Lite0 {args.size}px, batch {args.batch}", tp)
    if args.groups:
        print("throughput by unfrozen groups", flush=True)
        gt = group_throughput(args.size, args.batch, args.reps, args.groups)
        results["groups"] = gt
        _speed_table(f"fine-tuning step, Lite0 recipe {args.size}px, batch {args.batch}", gt)
    if "finetune" not in args.skip:
        sl = {**common, "data.max_per_class": args.per_class or None}
        print("frozen only", flush=True)
        frozen = run({**sl, "name": "frozen"})
        tuned = {}
        for bn in args.ft_bn:
            for ema in args.ft_ema:
                label = bn + (f", --ema {ema}" if ema else "")
                print(f"frozen head + fine-tuning, BatchNorm {label}", flush=True)
                tuned[label] = run({**sl, "name": f"finetuned-bn-{bn}" + (f"-ema{ema}" if ema else ""),
                                    "finetune.epochs": args.ft_epochs, "finetune.lr": args.ft_lr,
                                    "finetune.bn": bn, "finetune.ema": ema})
        results["finetune"] = {"frozen": frozen, **{f"finetuned, bn {k}": v for k, v in tuned.items()}}
        print(f"\n| {args.per_class or 'all'}/class, {args.size}px | test accuracy | wall time |")
        print("|---|---:|---:|")
        print(f"| frozen backbone, head 10 epochs | {100 * frozen['accuracy']:.2f}% | {frozen['wall_s']:.0f} s |")
        for bn, r in tuned.items():
            ft_s = sum(r["epoch_seconds"][-args.ft_epochs:])
            print(f"| + fine-tuning {args.ft_epochs} epochs (all groups, --bn {bn}) | {100 * r['accuracy']:.2f}% "
                  f"| {r['wall_s']:.0f} s (fine-tuning epochs {ft_s:.0f} s; features from the cache) |")
    if "augment" not in args.skip:
        sl = {**common, "data.max_per_class": args.aug_per_class, "train.flip_views": False}
        aug = {}
        for name, extra in (("none", {}), ("paper, on the fly", {"train.augment": "paper"}),
                            (f"paper, {args.views} cached views", {"train.augment": "paper",
                                                                    "train.cache_views": args.views})):
            print(f"augment: {name}", flush=True)
            aug[name] = run({**sl, **extra, "name": "aug-" + name.split(",")[-1].strip().replace(" ", "-")})
        results["augment"] = aug
        print(f"\n| paper augmentation + dropout, {args.aug_per_class}/class, {args.size}px | test accuracy | wall time |")
        print("|---|---:|---:|")
        for k, v in aug.items():
            print(f"| {k} | {100 * v['accuracy']:.2f}% | {v['wall_s']:.0f} s |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}  # parts run separately add up
    for part in ("throughput", "groups", "finetune", "augment"):
        if part in results:
            previous[part] = {**{k: results[k] for k in ("command", "date", "machine", "cpus", "torch")},
                              "result": results[part]}
    out.write_text(json.dumps(previous, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
