"""Benchmark of continual learning on Split CIFAR-10 (5 tasks of 2 classes), frozen Lite0 at 128 px.

    python bench/continual.py [--work DIR] [--cache-dir DIR] [--stages class,orders,linear,task,extend]
        [--redo STAGE] [--seeds 0,1,2] [--out bench/results/continual.json]

Stages, each a `graft continual` folder (or an extend run) under WORK, written to the JSON as soon
as it ends (temp file, then rename) and skipped on the next start when its result is there; a
killed stage goes on after its last finished task (`--resume`):
  class    class-incremental, every method, --seeds: the methods' table (naive, EWC, LwF, replay 500,
           NCM, ridge, joint), each run's wall time with the features cached; the first stage also
           pays the one backbone pass (timed apart)
  orders   ridge and NCM over 3 task orders (seed 0): the spread of final accuracy across orders
  linear   joint training of a linear head (no hidden layer) on the same features: the yardstick
           the ridge is held to (within 1 point)
  task     task-incremental (a head per task) on the frozen features with the recipe's shared hidden
           layer: naive, EWC, LwF, replay
  taskft   task-incremental with the backbone's top group (conv_head) trained too, on the cached
           maps below it (final features only, 2 epochs per task), --ft-seeds: naive, LwF, replay,
           EWC (each --ewc-lambdas value its own folder; choose on the validation matrix)
  combos   class-incremental online EWC and the combinations with replay (ewc+replay, lwf+replay),
           --seeds; and online EWC task-incremental on the frozen features
  prototypes  ridge and NCM again, class-incremental, --seeds, at the current default projection,
           on a quiet machine: their wall time with the features cached (target: a run within 60 s)
  adapt    ridge and NCM on the final features (`last`), frozen, against the same with the top 2
           groups adapted on the first task only (3 epochs), then frozen
  within   class-incremental ridge, NCM and joint training (the recipe's head) again, --seeds, at the
           current defaults: each run's within-task matrix (a task's test images scored among its own
           classes only) and its forgetting beside the Avalanche forgetting, which scores them among
           every class seen so far
  strength class-incremental ridge and joint training of a linear head, seed 0, on features of growing
           strength (Lite0 128 px final features only, Lite0 128 px multi-depth, Lite0 224 px
           multi-depth, Lite2 260 px multi-depth): how Avalanche's forgetting of each follows the
           features, not the method
  extend   `graft train` on 5 classes (airplane..deer), then `graft extend` with the other 5 by ridge
           and NCM (the run's head kept for the old classes, the default; extend.json also scores
           the prototype head alone) and by replay (the run's head, 500 stored rows): the old classes'
           accuracy before and after

The base config is recipes/paper-cifar10.yaml (multi-depth features, head 256, 10 epochs per task).
Runs in-process with this tree's graftnet; logs in WORK/<stage>/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRAFTNET_QUIET", "1")
from equivalence import atomic_write_json, git_state, loadavg, machine  # noqa: E402

RECIPE = ROOT / "recipes" / "paper-cifar10.yaml"
CIFAR_ZIP = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"
ALL_METHODS = ["naive", "ewc", "lwf", "replay", "ncm", "ridge", "joint"]


CACHE: Path | None = None   # --cache-dir: the feature cache (default WORK/cache)


def continual(work: Path, name: str, methods: list[str], seeds: list[int], scenario: str = "class",
              order_seeds=None, overrides: dict | None = None, **settings) -> dict:
    from graftnet.config import resolve
    from graftnet.continual.runner import run_continual
    from graftnet.continual.tasks import ContinualSettings, TaskSequence, split_tasks
    from graftnet.data.sources import open_source
    folder = work / name
    cfg = resolve(RECIPE, {"data.path": str(CIFAR_ZIP), "cache_dir": str(CACHE or work / "cache"),
                           **(overrides or {})})
    classes = open_source(cfg.data.path).classes
    sequences = {("given" if s is None else f"o{s}"): TaskSequence(cfg.data.path, split_tasks(classes, 5, s))
                 for s in (order_seeds or [None])}
    s = ContinualSettings(scenario=scenario, methods=methods, seeds=seeds, **settings)
    t0 = time.perf_counter()
    resume = (folder / "continual.yaml").is_file()
    summary = run_continual(None if resume else cfg, None if resume else sequences, None if resume else s, folder,
                            resume=resume)
    return {"folder": str(folder), "wall_s": time.perf_counter() - t0, "summary": summary}


def extract(classes: list[str], dest: Path) -> Path:
    """The shared ZIP's images of `classes` as a class folder with train/ and test/."""
    if (dest / ".done").is_file():
        return dest
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if len(parts) == 4 and parts[2] in classes and parts[3]:
                target = dest / parts[1] / parts[2] / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(info))
    (dest / ".done").touch()
    return dest


def stage_extend(work: Path) -> dict:
    from graftnet.config import resolve
    from graftnet.continual.extend import extend_run
    from graftnet.train.pipeline import train
    names = sorted(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    old, new = extract(names[:5], work / "data-a"), extract(names[5:], work / "data-b")
    run = work / "extend" / "five"
    t0 = time.perf_counter()
    if not (run / "model.safetensors").is_file():
        train(resolve(RECIPE, {"data.path": str(old), "cache_dir": str(work / "cache"), "out": str(run.parent),
                               "name": "five"}))
    train_s = time.perf_counter() - t0
    before = json.loads((run / "test_metrics.json").read_text())["accuracy"]
    out = {"train_s": train_s, "five_class_test_acc": before}
    # ridge, ncm: closed form from both tasks' statistics, the run's head kept; replay: the run's head + 500 stored rows
    for method in ("ridge", "ncm", "replay"):
        t0 = time.perf_counter()
        name = "five-extended" if method == "ridge" else f"five-extended-{method}"
        if not (run.parent / name / "extend.json").is_file():
            extend_run(run, str(new), method, name=name)
        out[method] = {"extend_s": time.perf_counter() - t0, **json.loads((run.parent / name / "extend.json").read_text())}
    return out


def stage_taskft(work: Path, seeds: list[int], lambdas: list[float]) -> dict:
    ft = {"backbone.features": "last", "train.epochs": 2}
    out = {"base": continual(work, "taskft", ["naive", "lwf", "replay"], seeds, "task", overrides=ft, top_groups=1)}
    for lam in lambdas:
        out[f"ewc_{lam:g}"] = continual(work, f"taskft-ewc{lam:g}", ["ewc"], seeds, "task", overrides=ft,
                                        top_groups=1, ewc_lambda=lam)
    return out


STRENGTHS = {   # name: config overrides, weakest features first
    "lite0-128-last": {"backbone.features": "last"},
    "lite0-128": {},
    "lite0-224": {"backbone.image_size": 224},
    "lite2-260": {"backbone.name": "efficientnet_lite2", "backbone.image_size": 260},
}


def stage_strength(work: Path, names: list[str], results: dict, out: Path) -> dict:
    """Each feature set's ridge and joint linear run; the stage's JSON grows after each (a killed
    stage goes on with the next feature set)."""
    done = results.setdefault("strength_partial", {})
    for name in names:
        if name not in done:
            t0 = time.perf_counter()
            done[name] = continual(work, f"strength-{name}", ["ridge", "joint"], [0],
                                   overrides={"head.hidden": [], **STRENGTHS[name]})
            done[name]["stage_s"] = time.perf_counter() - t0
            atomic_write_json(out, results)
    return {"feature_sets": {n: done[n] for n in names}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "continual")
    p.add_argument("--stages", default="class,orders,linear,task,extend,taskft,adapt")
    p.add_argument("--redo", default="", help="stages to run again although their result is there")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ewc-lambdas", default="100,10000,1000000", help="taskft: EWC strengths, one folder each")
    p.add_argument("--ft-seeds", default="0,1", help="taskft: seeds (each run trains the backbone's top)")
    p.add_argument("--strengths", default=",".join(STRENGTHS), help="strength: the feature sets, weakest first")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "continual.json")
    p.add_argument("--cache-dir", type=Path, help="feature cache (default WORK/cache); features cached by "
                   "another work folder or by graft itself (~/.cache/graftnet) are read, not recomputed")
    a = p.parse_args()
    global CACHE
    CACHE = a.cache_dir
    seeds = [int(s) for s in a.seeds.split(",")]
    results = json.loads(a.out.read_text()) if a.out.is_file() else {}
    results.update({"command": "python bench/continual.py " + " ".join(sys.argv[1:]), "machine": machine(),
                    "git": git_state(ROOT), "recipe": str(RECIPE.relative_to(ROOT))})
    stages = {
        "class": lambda: continual(a.work, "class", ALL_METHODS, seeds),
        "orders": lambda: continual(a.work, "orders", ["ncm", "ridge"], [0], order_seeds=[0, 1, 2]),
        "linear": lambda: continual(a.work, "linear", ["joint"], seeds, overrides={"head.hidden": []}),
        "task": lambda: continual(a.work, "task", ["naive", "ewc", "lwf", "replay", "joint"], seeds, scenario="task"),
        "extend": lambda: stage_extend(a.work),
        "adapt": lambda: {"frozen": continual(a.work, "adapt-frozen", ["ncm", "ridge"], [0], overrides={
                              "backbone.features": "last"}),
                          "adapted": continual(a.work, "adapt", ["ncm", "ridge"], seeds, overrides={
                              "backbone.features": "last", "train.epochs": 3}, top_groups=2)},
        "taskft": lambda: stage_taskft(a.work, [int(v) for v in a.ft_seeds.split(",")],
                                       [float(v) for v in a.ewc_lambdas.split(",")]),
        "prototypes": lambda: continual(a.work, "prototypes", ["ncm", "ridge"], seeds),
        "strength": lambda: stage_strength(a.work, [n for n in a.strengths.split(",") if n], results, a.out),
        "within": lambda: continual(a.work, "within", ["ridge", "ncm", "joint"], seeds),
        "combos": lambda: {"class": continual(a.work, "combos", ["online_ewc", "ewc+replay", "lwf+replay"], seeds),
                           "task": continual(a.work, "combos-task", ["online_ewc"], seeds, "task")},
    }
    redo = {s for s in a.redo.split(",") if s}
    for name in [s for s in a.stages.split(",") if s]:
        if name in results.get("stages", {}) and name not in redo:
            print(f"{name}: done before, skipped")
            continue
        if name in redo:   # a stage's folders start afresh: resuming them would read the old runs back
            import shutil
            for old in [a.work / name, *a.work.glob(f"{name}-*")]:
                shutil.rmtree(old, ignore_errors=True)
            results.pop(f"{name}_partial", None)
        print(f"{name}: running", flush=True)
        out = stages[name]()
        out.update({"date": dt.datetime.now().isoformat(timespec="seconds"), "loadavg": loadavg(),
                    "git": git_state(ROOT)})   # stages of one file may come from different commits
        results.setdefault("stages", {})[name] = out
        results.pop(f"{name}_partial", None)
        atomic_write_json(a.out, results)
        print(f"{name}: {json.dumps(out)[:400]}", flush=True)


if __name__ == "__main__":
    main()
