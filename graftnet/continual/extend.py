"""`graft extend RUN --data NEW`: a finished run learns the classes of NEW that it lacks.

The run's classes keep their output indices and the new ones are appended, so anything that stored
an old class's index (a database of predictions, a client) stays right. It is a two-task continual
run (continual/learner.py): task 1 is the run's own classes on its own data, task 2 the new classes.

- `ridge` (default) and `ncm` refit the head in closed form from the statistics of both tasks'
  cached features: no gradient step, no stored images; the old classes' statistics come from the
  run's own data (its config's data path), read again, not kept. By default (`--keep-old-head`) the
  run's trained MLP stays and still ranks the old classes, the prototype head ranking the new ones
  and deciding between the two groups (continual/gate.py): the old classes among themselves are
  predicted exactly as before. `--no-keep-old-head` saves the prototype head alone.
- `lwf`, `ewc`, `naive`, `replay` (and combinations) start from the run's trained head and train on
  the new classes' rows, with their term against forgetting.

The result is a run folder like any (predict, evaluate, export, serve), whose report and
extend.json show the old and the new classes' test accuracy before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from ..config import check_folder_name, resolve
from ..errors import ConfigError, DataError, GraftError
from ..io import atomic_write_json
from ..model import load_model, single_label_only
from ..progress import log
from .data import load_features, task_table
from .gate import gated_head
from .learner import score, score_within
from .methods import method_parts
from .runner import learn_run
from .tasks import ContinualSettings, Task, TaskSequence


def extend_run(run: str | Path, data: str, method: str = "ridge", out: str | None = None, name: str | None = None,
               settings: ContinualSettings | None = None, seed: int | None = None,
               keep_old_head: bool | None = None) -> Path:
    """`keep_old_head` None: on for the prototype methods (ridge, ncm), which are the ones it serves."""
    run = Path(run)
    old_model, spec = load_model(run)
    single_label_only(spec, run, "extend adds classes to a softmax head (one class per image)")
    if spec.gate:   # its config's data holds only the first classes; the kept MLP would nest
        raise GraftError(f"{run}: is an extended run already; extend the original run with all the new "
                         "classes at once (one --data folder holding them)")
    cfg = resolve(run / "config.yaml")
    if cfg.data.labels:
        raise GraftError(f"{run}: trained from a label file; extend joins class folders to a run's classes")
    if cfg.finetune.epochs or cfg.train.init or spec.pruned:
        raise GraftError(f"{run}: its backbone was changed (fine-tuned, started from another run or pruned); "
                         "extend reads the stock frozen backbone's features, which its head was not trained on")
    parts = method_parts(method)
    # On by default for ridge and ncm, by measurement (BENCHMARKS.md, CIFAR-10 5 + 5 classes): the kept
    # head lost nothing among the old classes where the ridge alone lost 2.94 points, and was better
    # over all ten too (81.94% against 80.91%; NCM 74.59% against 70.33%).
    keep = not parts[0].gradient if keep_old_head is None else keep_old_head
    if keep and parts[0].gradient:
        raise ConfigError(f"extend --keep-old-head: only with ridge or ncm; {method} trains the run's head itself")
    check_folder_name(name, "--name")
    folder = Path(out or run.parent) / (name or f"{run.name}-extended")
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder}: already exists and is not empty; choose another --name")
    from ..data.sources import open_source
    try:
        old_source = open_source(cfg.data.path, cfg.cache_dir)
    except DataError as e:
        raise DataError(f"extend: {run}'s own data cannot be read ({e}); extend takes the old classes' "
                        "statistics and their before/after scores from it") from None
    new_source = open_source(data, cfg.cache_dir, min_classes=1)  # joined to the run's classes
    new_classes = [c for c in new_source.classes if c not in spec.classes]
    if not new_classes:
        raise ConfigError(f"extend: {data} brings no class that {run} lacks (its classes: "
                          f"{', '.join(spec.classes)}); nothing to add")
    settings = settings or ContinualSettings()
    settings.scenario, settings.methods = "class", [method]
    seed = cfg.train.seed if seed is None else seed
    settings.seeds = [seed]
    seq = TaskSequence(cfg.data.path, [Task("old", list(spec.classes)), Task("new", new_classes, data=data)])
    features, model, fspec = load_features(cfg, seq, "class", built=(old_model, spec),
                                           opened={cfg.data.path: old_source, data: new_source})
    table = task_table(seq, features, "class")
    # the finished head's accuracy on the old classes' rows, over its own outputs (test: the report's
    # "before"; both splits: the first step of the matrices when the head is kept)
    before = {split: _old_accuracy(old_model.mlp, table, split) for split in ("test", "val")}
    before_acc, old_rows = before["test"], table.rows("test", [0])
    learner_hook = None
    if parts[0].gradient and not parts[0].cumulative:
        learner_hook = old_model.mlp   # start from the run's head
    t0 = time.perf_counter()
    kept: dict = {}
    finish = _keeper(table, old_model.mlp, len(spec.classes), spec.head, kept, before) if keep else None
    record, head = learn_run(table, method, seed, settings, cfg, (model, fspec), folder, seq, preset=learner_hook,
                             finish=finish)
    after = record["matrix"][-1]
    # the old rows among the old outputs only: what was forgotten, apart from the new classes now
    # competing for the same rows (a cat that is now called a dog)
    with torch.no_grad():
        among_old = head.eval()(table.x["test"][old_rows])[:, :len(spec.classes)].argmax(1)
    among_old_acc = (among_old == table.y["test"][old_rows]).float().mean().item()
    # class-incremental accuracy per task: old classes among all outputs, new ones likewise
    result = {"run": str(run), "data": data, "method": method, "old_classes": list(spec.classes),
              "new_classes": new_classes, "old_acc_before": before_acc, "old_acc_after": after[0],
              "new_acc_after": after[1], "old_change_points": 100 * (after[0] - before_acc),
              "old_acc_after_among_old": among_old_acc, "old_change_among_old_points": 100 * (among_old_acc - before_acc),
              "acc_after": _accuracy(head, table), "keep_old_head": keep, "seconds": time.perf_counter() - t0}
    if keep:   # what the prototype head alone would have given (--no-keep-old-head), for comparison
        proto, proto_after = kept["proto"], kept["proto_after"]
        with torch.no_grad():
            proto_among = proto.eval()(table.x["test"][old_rows])[:, :len(spec.classes)].argmax(1)
        result.update(gate_scales=kept["scales"], prototype_alone={
            "old_acc_after": proto_after[0], "new_acc_after": proto_after[1],
            "old_acc_after_among_old": (proto_among == table.y["test"][old_rows]).float().mean().item(),
            "acc_after": _accuracy(proto, table)})
    atomic_write_json(folder / "extend.json", result)
    log(f"extend: old classes {100 * before_acc:.2f}% -> {100 * after[0]:.2f}% among all classes "
        f"({result['old_change_points']:+.2f} points; {100 * among_old_acc:.2f}% among the old ones), "
        f"new classes {100 * after[1]:.2f}%")
    _report(folder, record, result, cfg)
    return folder


@torch.no_grad()
def _old_accuracy(old_mlp, table, split: str) -> float:
    """The finished run's head on the old task's rows of `split`, over its own outputs."""
    rows = table.rows(split, [0])
    return (old_mlp.eval()(table.x[split][rows]).argmax(1) == table.y[split][rows]).float().mean().item()


def _keeper(table, old_mlp, old_classes: int, old_head_cfg: dict, kept: dict, before: dict):
    """learn_run's `finish` for --keep-old-head: the prototype head becomes a GatedHead around the
    run's MLP, calibrated on validation rows, and the last matrix rows score it; `kept` receives the
    prototype head, its own last test row and the scales. The first step's model is the run itself,
    so the old task's cell of the first rows is the run's MLP's score (`before`, per split: the
    report's "before"), not the prototype head's fit on the old classes."""
    def finish(head, head_cfg, out):
        kept.update(proto=head, proto_after=list(out["matrix"][-1]))
        out["matrix"][0][0], out["val_matrix"][0][0] = before["test"], before["val"]
        if out.get("within_matrix"):   # among the old classes = among all seen then
            out["within_matrix"][0][0] = before["test"]
        gated = gated_head(old_mlp, head, old_classes, table.x["val"], table.y["val"])
        kept["scales"] = gated.scales.tolist()
        everything = torch.ones(len(table.classes), dtype=torch.bool)
        for split, key in (("test", "matrix"), ("val", "val_matrix")):
            with torch.no_grad():
                logits = gated(table.x[split])
            out[key][-1] = score(table, logits, table.y[split], table.task[split], "class", everything)
            if split == "test" and out.get("within_matrix"):   # the saved head's, like the matrix's
                out["within_matrix"][-1] = score_within(table, logits, table.y[split], table.task[split])
        out["prototype_last"] = kept["proto_after"]   # the record keeps the prototype head's own row too
        return gated, dict(old_head_cfg), {"gate": {"old_classes": old_classes, "hidden": list(head_cfg["hidden"])}}
    return finish


@torch.no_grad()
def _accuracy(head, table) -> float:
    """Test accuracy over all the classes, old and new."""
    return (head.eval()(table.x["test"]).argmax(1) == table.y["test"]).float().mean().item()


def _report(folder: Path, record: dict, result: dict, cfg) -> None:
    from ..report.html import write_report
    cards = {"method": result["method"], "old classes before": result["old_acc_before"],
             "old classes after": result["old_acc_after"], "new classes after": result["new_acc_after"],
             "change on old classes (points)": f"{result['old_change_points']:+.2f}",
             "all classes after": result["acc_after"]}
    rows = [["old: " + ", ".join(result["old_classes"]), result["old_acc_before"], result["old_acc_after"],
             result["old_acc_after_among_old"]],
            ["new: " + ", ".join(result["new_classes"]), "—", result["new_acc_after"], "—"]]
    note = ("Test accuracy of each group's images. Before: the finished run, among its own classes. After: "
            "among all the model's classes, and among the old classes only (what was forgotten, apart from "
            "new classes now competing for the same images).")
    alone = result.get("prototype_alone")
    if alone:   # --keep-old-head: the prototype head by itself, as --no-keep-old-head would have saved it
        cards["head"] = f"the run's head kept, {result['method']} for the new classes"
        rows += [[f"(old, {result['method']} head alone)", "—", alone["old_acc_after"], alone["old_acc_after_among_old"]],
                 [f"(new, {result['method']} head alone)", "—", alone["new_acc_after"], "—"]]
        note += (f" The rows in brackets: the {result['method']} head alone, without the run's head kept for the "
                 f"old classes (all classes: {100 * alone['acc_after']:.2f}%).")
    write_report(folder / "report.html", f"graftnet extend: {folder.name}", cards,
                 {"extend": {k: v for k, v in result.items() if k != "seconds"}, "base config": dataclasses.asdict(cfg)},
                 [], None, {"Accuracy on old and new classes (columns) after each step (rows), %": folder / "matrix.png"},
                 record.get("classes", []), tables=[("Old and new classes", note, ["classes", "before", "after", "after, among the old classes"], rows)],
                 tables_first=True)


def add_extend(sub) -> dict:
    p = sub.add_parser("extend", help="teach a finished run the classes of new data it lacks (old class "
                       "indices stay)", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished run folder (frozen backbone)")
    p.add_argument("--data", required=True, help="data with the new classes (folder, ZIP)")
    p.add_argument("--method", default="ridge", help="ridge (default), ncm, lwf, ewc, naive, replay, or a "
                   "combination such as lwf+replay")
    p.add_argument("--out", help="parent folder of the new run (default: beside RUN)")
    p.add_argument("--name", help="default: RUN-extended")
    p.add_argument("--seed", type=int, help="default: the run's seed")
    p.add_argument("--keep-old-head", action=argparse.BooleanOptionalAction, default=None,
                   help="ridge, ncm: keep the run's trained head for its own classes, the prototype head "
                   "adding the new ones and choosing between the two groups (default: on for ridge and ncm)")

    def cmd_extend(args) -> None:
        print(extend_run(args.run, args.data, args.method, args.out, args.name, seed=args.seed,
                         keep_old_head=args.keep_old_head))
    return {"extend": cmd_extend}
