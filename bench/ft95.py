"""The chain of fine-tuning runs behind this project's best CIFAR-10 result, as one command.

    python bench/ft95.py [--data ../shared/datasets/cifar10-jpeg.zip] [--out bench/.work/ft95]
        [--dry-run] [--smoke N]

BENCHMARKS.md (fine-tuning CIFAR-10, ensembles) reached its best result, 94.69% (five fine-tuned models, each scoring
images and their mirrors, probabilities averaged), over many separate runs, one `graft finetune` at a
time, each stage starting from the last one's weights at a larger input (progressive resizing).
Those run folders lived on one machine and were lost with it; this script is the chain as data,
so it can be rebuilt anywhere, e.g. on a GPU, where `graft` moves to the GPU by itself.

Each step is skipped when its run folder holds a test score, continued with `--resume` when the
folder exists without one (a killed run), else started: after a crash or a shut-down machine, run the
same command again. Then every member is evaluated with `--tta` and `graft ensemble --tta` builds
the ensemble as a run folder that predicts and serves. Writes OUT/chain.json (each step's command,
test accuracy with and without TTA, training seconds) and prints a table.

About 14 hours on this project's 2-core CPU (`hours` below: each step as measured in BENCHMARKS.md),
about 24 on a slower machine of the same kind.
`--smoke N` runs every step on N images per class, one epoch per stage, inputs a quarter of the
size: a check that the chain's commands still run (tests/test_ft95.py), not a result.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftnet import cli  # noqa: E402
from graftnet.io import atomic_write_json  # noqa: E402
from graftnet.run import read_history  # noqa: E402


@dataclass(frozen=True)
class Step:
    name: str
    backbone: str
    size: int
    finetune_epochs: int
    hours: float                 # on the 2-core CPU, stage 1 and the test pass included
    init: str | None = None      # an earlier step whose weights this one starts from (no stage 1)
    unfreeze: str = "top:5"
    lr: float = 5e-4
    augment: str = "randaugment"
    bn: str = "eval"
    member: bool = True          # one of the ensemble's models


LITE0, LITE1 = "efficientnet_lite0", "efficientnet_lite1"
# Lite1 first: its two steps give the best single model (94.06%, 94.33% with TTA) in 5 of the 14
# hours, so a chain cut off half-way has already bought the most.
CHAIN = [
    Step("lite1-160-ra3", LITE1, 160, 3, 2.25),
    Step("lite1-192-ra4-recipe", LITE1, 192, 4, 2.65, init="lite1-160-ra3"),
    Step("lite0-128-all-bneval3", LITE0, 128, 3, 1.0, unfreeze="all", augment="flip", member=False),
    Step("lite0-160-ra3-from-all", LITE0, 160, 3, 1.25, init="lite0-128-all-bneval3", lr=1e-4, member=False),
    Step("lite0-160-ra4-recipe", LITE0, 160, 4, 1.65, init="lite0-160-ra3-from-all"),
    Step("lite0-192-ra5-recipe", LITE0, 192, 5, 1.95, init="lite0-160-ra4-recipe"),
    Step("lite0-224-ra4-recipe", LITE0, 224, 4, 2.85, init="lite0-192-ra5-recipe"),
]
RESULT = 0.9469  # BENCHMARKS.md's best ensemble of the five members, all with flip TTA


def input_size(step: Step, smoke: int) -> int:
    return step.size // 4 if smoke else step.size


def finetune_args(step: Step, data: str, out: Path, smoke: int) -> list[str]:
    """The section's command for a step: the paper recipe's head, then stage 2 with label
    smoothing 0.1, each earlier group's rate 0.8 times the next, cosine after a 0.2-epoch warmup."""
    args = ["finetune", "--config", str(ROOT / "recipes" / "paper-cifar10.yaml"), "--data", data,
            "--out", str(out), "--name", step.name, "--backbone", step.backbone,
            "--image-size", str(input_size(step, smoke)),
            "--finetune-epochs", str(1 if smoke else step.finetune_epochs), "--unfreeze", step.unfreeze,
            "--finetune-lr", str(step.lr), "--lr-decay", "0.8", "--label-smoothing", "0.1",
            "--finetune-augment", step.augment, "--bn", step.bn, "--set", "finetune.warmup_epochs=0.2",
            "--checkpoint-minutes", "10"]
    if step.init:
        args += ["--init", str(out / step.init), "--epochs", "0"]
    elif smoke:
        args += ["--epochs", "1"]
    if smoke:
        args += ["--max-per-class", str(smoke), "--batch-size", "8"]
    return args


def graft(args: list[str], dry_run: bool, hours: float | None = None) -> None:
    print(f"$ graft {shlex.join(args)}" + (f"    # about {hours:g} h on the 2-core CPU" if hours else ""),
          flush=True)
    if not dry_run and cli.main(args) != 0:
        sys.exit(f"ft95: `graft {args[0]}` failed (above); run the same command again to continue")


def test_accuracy(folder: Path) -> float | None:
    f = folder / "test_metrics.json"
    return json.loads(f.read_text())["accuracy"] if f.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".work" / "ft95")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--smoke", type=int, default=0, metavar="N", help="N images per class, 1 epoch a stage")
    ap.add_argument("--cache-dir", help="feature cache (default graft's)")
    args = ap.parse_args()
    extra = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    t0 = time.time()
    for step in CHAIN:
        run = args.out / step.name
        if (done := test_accuracy(run)) is not None:
            print(f"{step.name}: done ({done:.2%}), skipped")
        elif (run / "config.yaml").is_file():
            graft(["finetune", "--resume", str(run)], args.dry_run, step.hours)
        else:
            graft(finetune_args(step, args.data, args.out, args.smoke) + extra, args.dry_run, step.hours)
    tta_folder = f"{Path(args.data).stem}-tta"
    members = [args.out / s.name for s in CHAIN if s.member]
    for run in members:
        if test_accuracy(run / "evaluations" / tta_folder) is None:
            graft(["evaluate", str(run), "--tta"], args.dry_run)
    ensemble = args.out / "ensemble-tta"
    if test_accuracy(ensemble) is None:
        graft(["ensemble", *map(str, members), "--tta", "--out", str(args.out), "--name", ensemble.name],
              args.dry_run)
    if args.dry_run:
        return
    rows = [{"run": s.name, "backbone": s.backbone,
             "command": "graft " + shlex.join(finetune_args(s, args.data, args.out, args.smoke) + extra),
             "input": input_size(s, args.smoke),
             "from": s.init, "member": s.member, "test": test_accuracy(args.out / s.name),
             "test_tta": test_accuracy(args.out / s.name / "evaluations" / tta_folder) if s.member else None,
             "train_seconds": sum(r["seconds"] for r in read_history(args.out / s.name))}
            for s in CHAIN]
    result = {"data": args.data, "smoke": args.smoke, "steps": rows, "ensemble_tta": test_accuracy(ensemble),
              "section_13_result": RESULT, "wall_seconds_this_call": time.time() - t0}
    atomic_write_json(args.out / "chain.json", result)
    print("\n| run | input | from | test | test, flip TTA | training |\n|---|---:|---|---:|---:|---:|")
    for r in rows:
        tta = f"{r['test_tta']:.2%}" if r["test_tta"] is not None else ""
        print(f"| {r['run']} | {r['input']} px | {r['from'] or ''} | {r['test']:.2%} | {tta} | "
              f"{r['train_seconds'] / 60:.1f} min |")
    print(f"| ensemble of the {len(members)} members, all with flip TTA | | | | "
          f"**{result['ensemble_tta']:.2%}** (BENCHMARKS.md: {RESULT:.2%}) | |")


if __name__ == "__main__":
    main()
