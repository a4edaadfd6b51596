"""What a checkpoint within an epoch costs: the time to write one of a fine-tuning run.

    python bench/checkpoint_cost.py [--backbone efficientnet_lite0] [--reps 5]

Builds the grafted model of the CIFAR-10 fine-tuning recipe (Lite0, multi-depth features, head 256),
unfreezes every group, takes one AdamW step so the optimizer holds its moments, then writes the
checkpoint that `--checkpoint-minutes` writes (whole model, moments, RNG, sums) `reps` times through
the same Checkpointer and reports the median time and the file's size. Writes
bench/results/checkpoint_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet import config  # noqa: E402
from graftnet.heads import make_mlp  # noqa: E402
from graftnet.model import build_model  # noqa: E402
from graftnet.train.checkpoint import FILE, Checkpointer  # noqa: E402
from graftnet.train.finetune import all_groups, optimizer_groups, set_trainable  # noqa: E402
from graftnet.train.loop import State, make_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cfg = config.resolve(ROOT / "recipes/finetune-cifar10.yaml", {"backbone.name": args.backbone})
    model, spec = build_model(cfg, [str(i) for i in range(10)])
    model.mlp = make_mlp(spec.feature_dim, 10, cfg.head)
    groups = all_groups(model)
    set_trainable(model, groups, len(groups) - 1)
    opt = make_optimizer(optimizer_groups(model, groups, 5e-4, 0.8, 0.01), "adamw", 5e-4, 0.01)
    model.train()
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    opt.step()
    generator = torch.Generator().manual_seed(0)
    state = State(epoch=3, step=1234, batch_in_epoch=170, epoch_rng=generator.get_state(),
                  partial={"loss": 1.0, "correct": 1, "seen": 2, "labeled": 2, "seconds": 600.0})
    times = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = Checkpointer(Path(d), model, opt, generator, full=True, every_s=1e-9)
        for _ in range(args.reps):
            t0 = time.perf_counter()
            ckpt.after_step(state)
            times.append(time.perf_counter() - t0)
        size = (Path(d) / FILE).stat().st_size
    out = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "backbone": args.backbone, "reps": args.reps,
           "seconds": times, "median_seconds": statistics.median(times), "file_bytes": size,
           "share_of_10_minutes": statistics.median(times) / 600}
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / "bench/results/checkpoint_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
