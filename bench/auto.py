"""Benchmark of `graft auto` on CIFAR-10: accuracy within a budget, and the plan's estimates.

    python bench/auto.py [--work DIR] [--stages dryrun,budget30,budget10,slice300,latency300] [--redo STAGE]
        [--out bench/results/auto.json]

Stages, each written to the JSON as soon as it ends (temp file, then rename) and skipped on the
next start when its result is there, so a killed benchmark goes on where it stopped:
  dryrun    `graft auto --data cifar10 --budget 30m --dry-run`: the plan as printed and the dry run's
            own wall time (the probe; nothing is trained)
  budget30  `graft auto --data cifar10 --budget 30m`: the shipped model's test accuracy (target: at
            least 88%, int8 when it ships) and the wall time against the budget (at most 110%)
  budget10  the same with --budget 10m (target: at least 80%)
  slice300  300 images per class and split (`--set data.max_per_class=300`) with --budget 10m,
            against `graft train --max-per-class 300` with its defaults on the same slice
  recipes300  the hand-made recipes on the same slice (--recipes; not in the default stages)
  ensemble100  100 images per class and split, Lite0 at 160 px, --budget 15m: the plan makes an ensemble;
            each exported model (single and ensemble) with its validation and, for the benchmark
            only, test accuracy (not in the default stages)
  resolution100  100 images per class and split, Lite0 at 160 px, --budget 8m: the plan takes a
            resolution step; the fine-tuned model before and after it scored on the test split for the
            benchmark only (not in the default stages)
  latency300  the slice with `--max-latency-ms 1.25` (--bound-ms), below what its int8 model took:
            the prune stage's decision and the shipped model's latency and accuracy (not in the
            default stages; at 1.0 ms the 1.78 ms int8 model would have needed 53% of its channels
            removed, and auto refused, as it does above its MAX_PRUNE of 50%)
Each real run's stages are compared with the plan: expected seconds / measured seconds per stage
("estimate_ratio"; 1.0 is a perfect estimate, above 1 an overestimate).

Every command runs in a subprocess with PYTHONPATH set to this tree (its graftnet is the one
measured) and GRAFTNET_QUIET=1; its log lies in WORK/logs. Wall times are of the whole command.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from search import graft, run_stages, test_accuracy  # noqa: E402


def auto(work: Path, name: str, budget: str, *extra: str) -> dict:
    """One `graft auto` run from a fresh folder: its result, per-stage estimates against times."""
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    cache = work / f"cache-{name}"   # cold, as a first run on a user's machine: decoding and backbone pass included
    shutil.rmtree(cache, ignore_errors=True)
    args = ["auto", "--data", "cifar10", "--budget", budget, "--out", str(work / "runs"), "--name", name,
            "--set", f"cache_dir={cache}", *extra]
    seconds = graft(args, work / "logs" / f"{name}.log")
    decisions = json.loads((work / "runs" / name / "decisions.json").read_text())
    stages = {k: {"expected_s": s.get("expected_s"), "seconds": s.get("seconds"), "status": s["status"],
                  "decision": s.get("decision"),
                  "estimate_ratio": round(s["expected_s"] / s["seconds"], 2)
                  if s.get("expected_s") and s.get("seconds") else None}
              for k, s in decisions["stages"].items()}
    result = decisions["result"]
    return {"command": "graft " + " ".join(args).replace(str(work), "WORK"), "seconds": round(seconds, 1),
            "budget_s": decisions["budget_s"], "wall_over_budget": round(seconds / decisions["budget_s"], 3),
            "shipped": result["model"], "test_accuracy": result["test_accuracy"],
            "chosen": decisions["probe"]["chosen"], "plan": decisions["plan"], "stages": stages}


def stage_dryrun(a, work: Path, results: dict) -> dict:
    log = work / "logs" / "dryrun.log"
    seconds = graft(["auto", "--data", "cifar10", "--budget", "30m", "--dry-run", "--out", str(work / "runs")], log)
    return {"command": "graft auto --data cifar10 --budget 30m --dry-run", "seconds": round(seconds, 1),
            "plan": log.read_text()[-4000:]}


def stage_budget30(a, work: Path, results: dict) -> dict:
    return {**auto(work, "budget30", "30m"), "targets": {"test_accuracy_at_least": 0.88, "wall_over_budget_at_most": 1.1}}


def stage_budget10(a, work: Path, results: dict) -> dict:
    return {**auto(work, "budget10", "10m"), "targets": {"test_accuracy_at_least": 0.80, "wall_over_budget_at_most": 1.1}}


def stage_slice300(a, work: Path, results: dict) -> dict:
    out = auto(work, "slice300", "10m", "--set", "data.max_per_class=300")
    shutil.rmtree(work / "runs" / "train300", ignore_errors=True)
    seconds = graft(["train", "--data", "cifar10", "--max-per-class", "300", "--out", str(work / "runs"),
                     "--name", "train300"], work / "logs" / "train300.log")
    base = test_accuracy(work / "runs" / "train300")
    return {**out, "graft_train_defaults": {"command": "graft train --data cifar10 --max-per-class 300",
                                            "seconds": round(seconds, 1), "test_accuracy": base},
            "points_over_train": round(100 * (out["test_accuracy"] - base), 2)}


def stage_latency300(a, work: Path, results: dict) -> dict:
    """The slice again with a latency bound its int8 model did not meet (1.56 ms at 160 px in the
    slice300 stage): the prune stage's decision, the shipped model's latency and test accuracy."""
    out = auto(work, "latency300", "10m", "--set", "data.max_per_class=300", "--max-latency-ms", str(a.bound_ms))
    decisions = json.loads((work / "runs" / "latency300" / "decisions.json").read_text())
    prune = decisions["stages"]["prune"]
    return {**out, "bound_ms": a.bound_ms, "meets": decisions["result"]["meets_latency"],
            "shipped_latency_ms": decisions["result"]["latency_ms"], "prune": prune.get("numbers") or {},
            "prune_decision": prune.get("decision")}


def stage_recipes300(a, work: Path, results: dict) -> dict:
    """The hand-made recipes on the slice300 stage's slice, from a cold cache each: the frozen paper
    recipe (`recipes/paper-cifar10.yaml`) and the fine-tuning one (`recipes/finetune-cifar10.yaml`),
    with their wall time; beside graft auto's 10 minutes on the same slice."""
    out = {}
    for name in a.recipes.split(","):
        run = f"recipe300-{name}"
        shutil.rmtree(work / "runs" / run, ignore_errors=True)
        shutil.rmtree(work / f"cache-{run}", ignore_errors=True)
        seconds = graft(["train", "--config", str(ROOT / "recipes" / f"{name}.yaml"), "--data", "cifar10",
                         "--max-per-class", "300", "--cache-dir", str(work / f"cache-{run}"),
                         "--out", str(work / "runs"), "--name", run], work / "logs" / f"{run}.log")
        out[name] = {"command": f"graft train --config recipes/{name}.yaml --data cifar10 --max-per-class 300",
                     "seconds": round(seconds, 1), "test_accuracy": test_accuracy(work / "runs" / run)}
    auto300 = results["stages"].get("slice300", {}).get("test_accuracy")
    if auto300 is not None:
        for r in out.values():
            r["auto_points_over"] = round(100 * (auto300 - r["test_accuracy"]), 2)
    return out


def stage_ensemble100(a, work: Path, results: dict) -> dict:
    """100 images per class and split with --budget 15m: small enough that fine-tuning gets all its
    epochs and the plan makes an ensemble. The ensemble stage's members and every exported model's
    validation accuracy and latency; after the run, and for this benchmark only (auto scores only
    the file it ships), the files it did not ship scored on the test split too."""
    # Lite0 at 160 px: the default candidates choose 224 px on this slice, where 10 fine-tuning epochs
    # (5m38s) leave no room for a second member in 15 minutes
    out = auto(work, "ensemble100", "15m", "--set", "data.max_per_class=100", "--backbones", "efficientnet_lite0:160")
    folder = work / "runs" / "ensemble100"
    decisions = json.loads((folder / "decisions.json").read_text())
    export = decisions["stages"]["export"].get("numbers") or {}
    models = {k: {f: m.get(f) for f in ("val_acc", "latency_ms", "size_mb", "error")} for k, m in export.get("models", {}).items()}
    sys.path.insert(0, str(ROOT))
    from graftnet.auto.stages import test_score
    for k, m in export.get("models", {}).items():
        if "error" not in m:
            models[k]["test_accuracy_bench_only"] = test_score(m["model"], export["run"])["accuracy"]
    return {**out, "members": decisions["plan"].get("members"), "ensemble": decisions["stages"]["ensemble"],
            "models": models}


def stage_resolution100(a, work: Path, results: dict) -> dict:
    """100 images per class and split with --budget 8m: all 10 fine-tuning epochs fit, a second member
    does not, and the plan takes a resolution step (160 -> 192 px). After the run, for this benchmark
    only, the fine-tuned model before the step exported and scored on the test split beside the
    step's, so the step's decision can be checked against the split auto never looks at."""
    out = auto(work, "resolution100", "8m", "--set", "data.max_per_class=100", "--backbones", "efficientnet_lite0:160")
    decisions = json.loads((work / "runs" / "resolution100" / "decisions.json").read_text())
    sys.path.insert(0, str(ROOT))
    from graftnet.auto.stages import measure, test_score
    scored = {}
    for stage in ("finetune", "resolution"):
        numbers = decisions["stages"][stage].get("numbers") or {}
        if numbers.get("run"):
            models = measure(numbers["run"], numbers["val_acc"])
            scored[stage] = {"run": numbers["run"].replace(str(work), "WORK"), "kept": numbers.get("kept"),
                             **{k: {"val_acc": m.get("val_acc"), "latency_ms": m.get("latency_ms"),
                                    "test_accuracy_bench_only": test_score(m["model"], numbers["run"])["accuracy"]}
                                for k, m in models.items() if "error" not in m}}
    return {**out, "resolution": decisions["stages"]["resolution"], "scored": scored}


STAGES = {"dryrun": stage_dryrun, "budget30": stage_budget30, "budget10": stage_budget10, "slice300": stage_slice300,
          "latency300": stage_latency300, "recipes300": stage_recipes300, "ensemble100": stage_ensemble100,
          "resolution100": stage_resolution100}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "auto"))
    p.add_argument("--stages", default="dryrun,budget30,budget10,slice300")
    p.add_argument("--redo", action="append", default=[], help="rerun this stage though its result is there")
    p.add_argument("--recipes", default="paper-cifar10,finetune-cifar10", help="recipes300's recipes")
    p.add_argument("--bound-ms", type=float, default=1.25, help="latency300's --max-latency-ms")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "auto.json"))
    run_stages(p.parse_args(), STAGES, "bench/auto.py", ("plan", "stages"))


if __name__ == "__main__":
    main()
