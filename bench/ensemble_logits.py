"""What would an ensemble of finished models score? From their saved test logits, no re-scoring.

    python bench/ensemble_logits.py RUN_OR_EVALUATION [...] --out bench/.work/ens-x [--json FILE]

Each argument is a folder holding test_logits.safetensors and test_predictions.csv (a run folder,
or an evaluation folder such as RUN/evaluations/cifar10-jpeg-tta). The ensemble averages the
members' probabilities with equal weights (graftnet.ensemble.combine, what `graft ensemble` does
without --weighted), writes its own per-image files to --out, and is compared with its best
member by `graft compare`'s paired test. Scoring 10,000 CIFAR-10 test images at 192 px takes
this 2-core CPU about 5 minutes per model and flip; this takes seconds, so ensembles of the runs
of BENCHMARKS.md's ensembles can be tried without re-running them. `graft ensemble` remains the way to build
one that predicts and serves (`--tta` for members scored with their mirrors, as the evaluation
folders `RUN/evaluations/*-tta` were).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graftnet.compare import compare, label  # noqa: E402
from graftnet.ensemble import combine  # noqa: E402
from graftnet.evaluation import write_predictions  # noqa: E402
from graftnet.metrics import wilson_interval  # noqa: E402


def load(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    with safe_open(folder / "test_logits.safetensors", "pt") as f:
        logits, labels = f.get_tensor("logits"), f.get_tensor("labels")
        classes = json.loads(f.metadata()["classes"])
    with (folder / "test_predictions.csv").open(newline="") as f:
        keys = [r["file"] for r in csv.DictReader(f)]
    if len(keys) != len(logits):
        sys.exit(f"{folder}: {len(keys)} rows in test_predictions.csv, {len(logits)} logits")
    return logits, labels, keys, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for the ensemble's per-image files")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    loaded = [load(m) for m in args.members]
    _, labels, keys, classes = loaded[0]
    for m, (_, y, k, c) in zip(args.members[1:], loaded[1:]):
        if k != keys or c != classes or not torch.equal(y, labels):
            sys.exit(f"{m}: other images, order or classes than {args.members[0]}")
    logits = combine([lg for lg, *_ in loaded], torch.full((len(loaded),), 1 / len(loaded)))
    write_predictions(args.out, "", logits, labels, keys, classes)

    rows = []
    for m, (lg, *_) in zip(args.members, loaded):
        right = int((lg.argmax(1) == labels).sum())
        rows.append({"member": label(m), "folder": str(m), "accuracy": right / len(labels),
                     "ci95": wilson_interval(right, len(labels))})
    right = int((logits.argmax(1) == labels).sum())
    best = max(range(len(rows)), key=lambda i: rows[i]["accuracy"])
    paired = compare(args.members[best], args.out)
    result = {"members": rows, "ensemble": {"accuracy": right / len(labels),
                                            "ci95": wilson_interval(right, len(labels)),
                                            "weights": "equal"},
              "against_best_member": paired}
    for r in rows:
        print(f"{r['member']:50s} {r['accuracy']:.4f}  (95% CI {r['ci95'][0]:.4f}-{r['ci95'][1]:.4f})")
    e = result["ensemble"]
    print(f"{'ensemble (equal weights)':50s} {e['accuracy']:.4f}  (95% CI {e['ci95'][0]:.4f}-{e['ci95'][1]:.4f})")
    print(f"against {rows[best]['member']}: {100 * paired['difference']:+.2f} points, only the member right "
          f"{paired['only_a_right']}, only the ensemble {paired['only_b_right']}, McNemar p = {paired['mcnemar_p']:.3g}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
