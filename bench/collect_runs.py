"""Summarise finished run folders into one results file, for runs made with `graft` itself.

    python bench/collect_runs.py RUN [RUN ...] --out bench/results/NAME.json

Run folders live in ignored places (bench/.work, runs/); this keeps what BENCHMARKS.md cites: each
run's command, environment, resolved config, per-epoch history and test metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graftnet.run import read_history  # noqa: E402


def evaluations(run: Path) -> dict:
    """Later `graft evaluate` results kept in the run folder (`<data>-tta` for `--tta`), with the
    evaluation's command and time where it recorded them. Folders without a
    training_environment.json predate that: their environment.json is the training run's copy."""
    out = {}
    for d in sorted((run / "evaluations").glob("*/")):
        if (d / "test_metrics.json").is_file():
            test = json.loads((d / "test_metrics.json").read_text())
            out[d.name] = {"accuracy": test["accuracy"], "n": test["n"]}
            if (d / "training_environment.json").is_file():
                env = json.loads((d / "environment.json").read_text())
                out[d.name].update(command=env.get("command"), time=env.get("time"))
    return out


def summary(run: Path) -> dict:
    env = json.loads((run / "environment.json").read_text())
    # a run still training (or killed) has no test score yet: its history so far is still worth keeping
    done = (run / "test_metrics.json").is_file()
    test = json.loads((run / "test_metrics.json").read_text()) if done else {}
    history = read_history(run)
    return {"run": str(run), "command": env.get("command"), "started": env.get("time"),
            "environment": env, "config": yaml.safe_load((run / "config.yaml").read_text()),
            "finished": done, "test_accuracy": test.get("accuracy"), "n_test": test.get("n"),
            "top_k": test.get("top_k"),
            "history": history, "epoch_seconds_sum": sum(r["seconds"] for r in history),
            "evaluations": evaluations(run)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [summary(r) for r in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    for r in rows:
        test = f"test {100 * r['test_accuracy']:.2f}% ({r['n_test']})" if r["finished"] else "not finished"
        print(f"{r['run']}: {test}, epochs {len(r['history'])}, {r['epoch_seconds_sum']:.0f} s in epochs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
