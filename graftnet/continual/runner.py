"""`run_continual`: every method x seed x task order over one task sequence's cached features, each a
run folder, then the methods' table, plots and report.

    CONTINUAL/config.yaml, continual.yaml    the base run config; settings and task sequences
    CONTINUAL/runs/<method>-s<seed>[-o<order>]/   one run folder each: model.safetensors + model.json
        (the head after the last task: predict, evaluate, export and serve read it), config.yaml,
        continual.json (accuracy matrix, metrics, seconds), matrix.png, metrics.jsonl, report.html
    CONTINUAL/summary.json, steps.png, report.html

A folder is resumable: a finished run (its continual.json) is read, not rerun; an unfinished one
goes on after its last finished task (learner.py).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path

import yaml
from torch import nn

from ..config import RunConfig, HeadConfig, save_yaml, resolve
from ..errors import ConfigError, GraftError
from ..io import atomic_write_json, atomic_write_text
from ..model import save_model
from ..progress import log
from ..run import run_scope, write_environment, write_history
from .data import load_features, task_table
from .learner import Learner
from .metrics import mean_sd, summarize
from .report import COLUMNS, WITHIN_KEYS, plot_matrix, plot_steps, write_continual_report
from .tasks import ContinualSettings, Task, TaskSequence, check_tasks

SETTINGS = "continual.yaml"


def save_setup(folder: Path, cfg: RunConfig, settings: ContinualSettings, sequences: dict[str, TaskSequence],
               command: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, folder / "config.yaml", header="base config of every run in this continual folder")
    plain = {"command": command, "settings": dataclasses.asdict(settings),
             "sequences": {k: dataclasses.asdict(s) for k, s in sequences.items()}}
    atomic_write_text(folder / SETTINGS, yaml.safe_dump(plain, sort_keys=False))


def load_setup(folder: Path) -> tuple[RunConfig, ContinualSettings, dict[str, TaskSequence]]:
    path = folder / SETTINGS
    if not path.is_file() or not (folder / "config.yaml").is_file():
        raise GraftError(f"{folder}: not a continual folder (no {SETTINGS} or config.yaml); nothing to resume")
    raw = yaml.safe_load(path.read_text())
    settings = ContinualSettings(**raw["settings"])
    sequences = {k: TaskSequence(v["data"], [Task(**t) for t in v["tasks"]]) for k, v in raw["sequences"].items()}
    return resolve(folder / "config.yaml"), settings, sequences


def run_continual(cfg: RunConfig | None, sequences: dict[str, TaskSequence] | None,
                  settings: ContinualSettings | None, folder: Path, resume: bool = False,
                  command: str = "") -> dict:
    """`sequences`: label -> task sequence (one per task order). Returns the summary (summary.json)."""
    folder = Path(folder)
    if resume:
        cfg, settings, sequences = load_setup(folder)
    else:
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder}: already exists and is not empty; choose another --name or --resume it")
        settings.check()
        check_config(cfg)
        if settings.top_groups and (cfg.backbone.features != "last" or cfg.head.pool != "avg"):
            raise ConfigError("top_groups trains the backbone's top on its maps: use backbone.features last, head.pool avg")
        save_setup(folder, cfg, settings, sequences, command)
    # a failure before any run exists leaves no half-made folder (the log goes to CONTINUAL/log.txt)
    with run_scope(folder, keep_if=("runs",), remove=not resume):
        t0 = time.perf_counter()
        first = next(iter(sequences.values()))
        features, model, spec = load_features(cfg, first, settings.scenario, top_groups=settings.top_groups)
        for seq in list(sequences.values())[1:]:   # another order of the same classes: same sources
            check_tasks(seq, settings.scenario, {loc: f.source.classes for loc, f in features.items()})
        feature_s = time.perf_counter() - t0
        results: dict[str, list[dict]] = {}
        first_run: dict[str, Path] = {}   # each method's first run folder: its matrix.png goes in the report
        for label, seq in sequences.items():
            table = task_table(seq, features, settings.scenario)
            for method in settings.methods:
                for seed in settings.seeds:
                    run_dir = folder / "runs" / (f"{method}-s{seed}" + (f"-{label}" if len(sequences) > 1 else ""))
                    first_run.setdefault(method, run_dir)
                    results.setdefault(method, []).append(learn_run(table, method, seed, settings, cfg, (model, spec),
                                                                   run_dir, seq)[0])
        summary = _summarize(results, settings, first, sequences, feature_s)
        atomic_write_json(folder / "summary.json", summary)
        _write_pages(folder, summary, results, first_run, first, cfg, settings)
        return summary


def check_config(cfg: RunConfig) -> None:
    """Settings of `graft train` that a continual run does not use: say so rather than ignore them."""
    t = cfg.train
    unused = {"train.augment": t.augment != "none", "train.mixup/cutmix": bool(t.mixup or t.cutmix),
              "train.cache_views": bool(t.cache_views), "train.flip_views": t.flip_views,
              "train.label_smoothing": bool(t.label_smoothing), "train.class_weights": t.class_weights != "none",
              "train.sampler": t.sampler != "none", "train.early_stopping": bool(t.early_stopping),
              "train.init": bool(t.init), "finetune.epochs": bool(cfg.finetune.epochs),
              "callbacks": bool(cfg.callbacks)}
    given = [k for k, v in unused.items() if v]
    if given:
        raise ConfigError(f"continual: {', '.join(given)} not used here (each task trains on cached features, "
                          "or with --top-groups on cached maps); drop them")


def learn_run(table, method: str, seed: int, settings: ContinualSettings, cfg: RunConfig, backbone: tuple,
             run_dir: Path, seq: TaskSequence, preset=None, finish=None) -> tuple[dict, nn.Module | None]:
    """One method and seed, learned (or read back when finished before) and saved as a run folder:
    its record (continual.json) and final head (None when read back). `preset`: a finished run's
    head that counts as having learned the first task (extend). `finish(head, head_cfg, out)`: the
    head that is saved instead of the learner's, its head config and model.json changes; it may
    rescore out's last matrix rows, which the record then holds (extend --keep-old-head)."""
    done = run_dir / "continual.json"
    if done.is_file():
        log(f"{run_dir.name}: done before, read from {done}")
        return json.loads(done.read_text()), None
    learner = Learner(table, method, seed, settings, cfg, run_dir, base=backbone[0])
    learner.preset = preset
    out = learner.run()
    head, head_cfg = learner.final_head()
    spec_changes = {}
    if finish is not None:
        head, head_cfg, spec_changes = finish(head, head_cfg, out)
    sizes = [int((table.task["test"] == i).sum()) for i in range(len(table.task_cols))]
    metrics = summarize(out["matrix"], out["initial"], sizes)
    val_sizes = [int((table.task["val"] == i).sum()) for i in range(len(table.task_cols))]
    val_metrics = summarize(out["val_matrix"], None, val_sizes) if all(val_sizes) else None
    # class-incremental: the same metrics of the within-task matrix (each task's rows among its own
    # classes only), by the same definitions; no initial accuracies, so no FWT
    within = out.get("within_matrix")
    within_metrics = summarize(within, None, sizes) if within else None
    record = {"method": method, "seed": seed, "scenario": settings.scenario, "tasks": table.task_names,
              "task_classes": [t.classes for t in seq.tasks], "classes": table.classes, **out, "metrics": metrics,
              "val_metrics": val_metrics, **({"within_metrics": within_metrics} if within_metrics else {}),
              "total_seconds": sum(out["seconds"])}
    run_cfg = replace(cfg, head=HeadConfig(**head_cfg), name=run_dir.name, out=str(run_dir.parent),
                      data=replace(cfg.data, path=seq.data), train=replace(cfg.train, seed=seed))
    model, spec = backbone   # the backbone the features came from, with this run's head
    if hasattr(head, "into"):   # a trained top of the backbone: into a copy of it
        model = head.into(model)
    else:
        model.mlp = head
    save_model(model.cpu(), replace(spec, classes=list(table.classes), head=head_cfg, **spec_changes), run_dir)
    save_yaml(run_cfg, run_dir / "config.yaml", header=f"continual run: {method}, seed {seed}")
    write_environment(run_dir, seed)
    write_history(run_dir, learner.history)
    plot_matrix(out["matrix"], table.task_names, f"{method}, seed {seed}", run_dir / "matrix.png")
    atomic_write_json(done, record)
    cards = {"method": method, "seed": seed, "final accuracy": metrics["final_acc"],
             "forgetting": metrics["forgetting"] if metrics["forgetting"] is not None else "—"}
    if within_metrics:
        cards["forgetting within task"] = within_metrics["forgetting"] if within_metrics["forgetting"] is not None else "—"
    from ..report.html import write_report
    write_report(run_dir / "report.html", f"graftnet continual run {run_dir.name}", cards,
                 dataclasses.asdict(run_cfg), learner.history, None,
                 {"Accuracy on each task (columns) after each task (rows), %": run_dir / "matrix.png"}, table.classes)
    return record, head


def _summarize(results: dict[str, list[dict]], settings: ContinualSettings, seq: TaskSequence,
               sequences: dict, feature_s: float) -> dict:
    methods = {}
    for name, runs in results.items():
        steps = [r["metrics"]["acc_per_step"] for r in runs]
        per_step = [mean_sd([{"a": s[j]} for s in steps])["a"] for j in range(len(steps[0]))]
        methods[name] = {"runs": len(runs), "metrics": mean_sd([r["metrics"] for r in runs], list(COLUMNS)),
                         "seconds": mean_sd([{"s": r["total_seconds"]} for r in runs])["s"],
                         "acc_per_step": [(p["mean"], p["sd"]) for p in per_step]}
        if settings.scenario == "class":   # runs recorded before it was kept count as missing (n says how many)
            methods[name]["within_metrics"] = mean_sd([r.get("within_metrics") or {} for r in runs], WITHIN_KEYS)
    finals = {n: m["metrics"]["final_acc"]["mean"] for n, m in methods.items()
              if m["metrics"].get("final_acc", {}).get("mean") is not None}
    best = max(finals, key=finals.get) if finals else None
    return {"scenario": settings.scenario, "tasks": [t.name for t in seq.tasks], "seeds": settings.seeds,
            "orders": len(sequences), "feature_seconds": feature_s, "methods": methods,
            "best": f"{best} ({100 * finals[best]:.2f}%)" if best else None}


def _write_pages(folder: Path, summary: dict, results: dict, first_run: dict[str, Path], seq: TaskSequence,
                 cfg: RunConfig, settings: ContinualSettings) -> None:
    from rich.table import Table
    from ..progress import make_console
    from .report import table_header, table_rows
    images = {"Accuracy on the tasks seen so far after each task (mean ± sd)":
              plot_steps({n: m["acc_per_step"] for n, m in summary["methods"].items()},
                         summary["tasks"], folder / "steps.png")}
    for name, runs in results.items():   # each method's first run drew its matrix already
        images[f"{name}: accuracy on each task (columns) after each task (rows), seed {runs[0]['seed']}, %"] = \
            first_run[name] / "matrix.png"
    write_continual_report(folder, summary, {"settings": dataclasses.asdict(settings),
                                             "tasks": [dataclasses.asdict(t) for t in seq.tasks],
                                             "base config": dataclasses.asdict(cfg)}, images)
    table = Table(title=f"continual learning, {settings.scenario}-incremental, {len(seq.tasks)} tasks "
                        f"(points, mean ± sd over {len(results[next(iter(results))])} run(s) per method)")
    for h in ["method", *table_header(summary), "s/run", "runs"]:
        table.add_column(h, justify="left" if h == "method" else "right")
    for row in table_rows(summary):
        table.add_row(*map(str, row))
    make_console().print(table)
