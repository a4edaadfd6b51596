"""Hyperparameter search of the head on the frozen backbone (Optuna): `graft search`.

    graft search --data DIR --trials 30 --timeout 1h [--space space.yaml]

Each trial is an ordinary run (`train(cfg, test=False)`) under SEARCH/trials/trial-NNN. Trials with
the same backbone, image size, features and data share the feature cache, so after the first one a
trial costs seconds. Trials are chosen on validation accuracy alone; only the best trial's run is
scored on the test split, once, so the test accuracy in search.json is not itself chosen by the search.
The study lives in SEARCH/study.journal (Optuna's journal file: append-only, survives a kill), so
`graft search --resume SEARCH --trials N` goes on until N trials are done.

A space is YAML, dotted config key -> one entry:
    train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}
    train.weight_decay: {type: float, low: 1e-6, high: 1e-2, log: true, zero: true}   # or exactly 0
    head.hidden: {type: layers, low: 0, high: 2, choices: [128, 256, 512]}   # layer count, width each
    train.optimizer: {type: categorical, choices: [adam, adamw]}
    train.flip_views: {type: bool, when: {backbone.features: multi}}   # sampled only when ... equals
`when` compares with the value sampled earlier in the space, else with the base config's.

Not in this slice (later): architecture search beyond the head's widths, multi-objective search
(accuracy against latency), distributed workers on PostgreSQL, plots and a report.html, the benchmark.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import signal
import threading
import time
from pathlib import Path

import yaml

from .config import KEYS, RunConfig, load_yaml, resolve, save_yaml
from .errors import ConfigError, GraftError
from .fields import suggest
from .io import atomic_write_json, atomic_write_text
from .progress import log
from .train.loop import Callback

STUDY = "graft-search"   # one study per search folder: the fixed name is what --resume loads
TYPES = ("float", "int", "categorical", "bool", "layers")

DEFAULT_SPACE: dict[str, dict] = {
    "head.hidden": {"type": "layers", "low": 0, "high": 2, "choices": [128, 256, 512, 1024]},
    "head.dropout": {"type": "float", "low": 0.0, "high": 0.6},
    "head.activation": {"type": "categorical", "choices": ["relu", "gelu", "silu"]},
    "train.optimizer": {"type": "categorical", "choices": ["adam", "adamw"]},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True, "zero": True},
    "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "train.batch_size": {"type": "categorical", "choices": [64, 128, 256]},
    "train.epochs": {"type": "int", "low": 5, "high": 20},
    # flipped views and an augmentation preset exclude each other (config.validate)
    "train.flip_views": {"type": "bool", "when": {"train.augment": "none"}},
    "backbone.features": {"type": "categorical", "choices": ["last", "multi"]},
}


def check_space(space: dict) -> dict:
    """The space, checked: one ConfigError line for the first thing wrong, before any folder exists."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("search space: empty; give at least one config key to search")
    for key, entry in space.items():
        if key not in KEYS:
            near = suggest(key, KEYS)
            raise ConfigError(f"search space: unknown config key {key}"
                              + (f"; did you mean {near}?" if near else ""))
        if not isinstance(entry, dict) or entry.get("type") not in TYPES:
            raise ConfigError(f"search space: {key}: needs type: one of {', '.join(TYPES)}")
        kind = entry["type"]
        if kind in ("float", "int", "layers"):
            if "low" not in entry or "high" not in entry:
                raise ConfigError(f"search space: {key}: a {kind} needs low and high")
            if not entry["low"] < entry["high"]:
                raise ConfigError(f"search space: {key}: low ({entry['low']}) must be below high ({entry['high']})")
            if entry.get("log") and entry["low"] <= 0:
                raise ConfigError(f"search space: {key}: a log range needs low > 0")
        if kind in ("categorical", "layers") and not entry.get("choices"):
            raise ConfigError(f"search space: {key}: empty choices")
        for other in entry.get("when") or {}:
            if other not in KEYS:
                raise ConfigError(f"search space: {key}: `when` names unknown config key {other}")
    return space


def sample(trial, space: dict, base: RunConfig) -> dict:
    """{config key: value} for one trial. Conditional parameters get their own Optuna names
    (head.hidden.1 exists only in trials with two layers), so TPE models each on the trials that have it."""
    chosen: dict = {}
    for key, e in space.items():
        if any((chosen[k] if k in chosen else _value(base, k)) != v for k, v in (e.get("when") or {}).items()):
            continue
        kind = e["type"]
        if kind == "float":
            if e.get("zero") and trial.suggest_categorical(f"{key}.zero", [False, True]):
                chosen[key] = 0.0
                continue
            chosen[key] = trial.suggest_float(key, e["low"], e["high"], log=bool(e.get("log")))
        elif kind == "int":
            chosen[key] = trial.suggest_int(key, e["low"], e["high"], log=bool(e.get("log")))
        elif kind == "categorical":
            chosen[key] = trial.suggest_categorical(key, list(e["choices"]))
        elif kind == "bool":
            chosen[key] = trial.suggest_categorical(key, [False, True])
        else:  # layers: a count, then a width per layer that exists
            n = trial.suggest_int(f"{key}.layers", e["low"], e["high"])
            chosen[key] = [trial.suggest_categorical(f"{key}.{i}", list(e["choices"])) for i in range(n)]
    return chosen


def _value(cfg: RunConfig, key: str):
    """The base config's value at a dotted key (`callbacks.x.y` goes into a plain dict)."""
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


class TrialReporter(Callback):
    """Reports each epoch's validation accuracy to the trial and ends the fit early when the
    pruner (median of earlier trials at the same epoch) says this trial will not win."""

    def __init__(self, trial):
        self.trial, self.pruned, self.step = trial, False, 0

    def after_epoch(self, state, row: dict) -> None:
        acc = row.get("val_acc")
        if acc is None or acc != acc:  # no validation split, or NaN: nothing to choose trials by
            raise GraftError("search: trials are chosen on validation accuracy; the data has no "
                             "validation split (set data.val_fraction > 0)")
        self.step += 1
        self.trial.report(float(acc), self.step)
        if self.trial.should_prune():
            self.pruned = state.stop = True


def saved_val_acc(cfg: RunConfig, history: list[dict]) -> float:
    """The validation accuracy of the model the run saved: the last epoch's, or with early
    stopping the restored best epoch's (by the monitored value)."""
    rows = [r for r in history if r.get("val_acc") == r.get("val_acc") and "val_acc" in r]
    if not rows:
        raise GraftError("search: the trial logged no validation accuracy")
    if cfg.train.early_stopping:
        best = (max(rows, key=lambda r: r["val_acc"]) if cfg.train.monitor == "val_acc"
                else min(rows, key=lambda r: r.get("val_loss", float("inf"))))
        return float(best["val_acc"])
    return float(rows[-1]["val_acc"])


class _StopAfterTrial:
    """The first Ctrl-C lets the running trial finish, then the search stops and writes its
    results; a second one interrupts the trial (it is recorded as failed)."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("[yellow]stopping after this trial (Ctrl-C again to stop now)[/]")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def open_study(folder: Path, seed: int, load: bool):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says it all
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "study.journal")))
    # A resumed study reseeds with the trial count: the same seed would replay the first trials' draws.
    done = len(optuna.load_study(study_name=STUDY, storage=storage).trials) if load else 0
    return optuna.create_study(study_name=STUDY, storage=storage, direction="maximize", load_if_exists=load,
                               sampler=optuna.samplers.TPESampler(seed=seed + done),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))


def run_search(cfg: RunConfig | None, space: dict | None, folder: str | Path, trials: int = 20,
               timeout_s: float | None = None, resume: bool = False, command: str | None = None) -> dict:
    """Run (or continue, with `resume`) a search in `folder` until it holds `trials` finished
    trials or `timeout_s` has passed; returns what search.json holds."""
    from optuna.trial import TrialState
    from .evaluation import evaluate_run
    from .train.pipeline import train
    folder = Path(folder)
    if resume:
        if not (folder / "study.journal").is_file() or not (folder / "base.yaml").is_file():
            raise GraftError(f"{folder}: not a search folder (no study.journal and base.yaml); nothing to resume")
        cfg, space = resolve(folder / "base.yaml"), check_space(load_yaml(folder / "space.yaml"))
    else:
        check_space(space)
        if folder.exists() and any(folder.iterdir()):
            raise GraftError(f"{folder}: exists and is not empty; continue it with --resume or pick --name")
        folder.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, folder / "base.yaml", "the base config every trial starts from")
        atomic_write_text(folder / "space.yaml", yaml.safe_dump(space, sort_keys=False))
    study = open_study(folder, cfg.train.seed, resume)
    for t in study.trials:  # a killed search left its running trial behind: it never finished
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
    finished = lambda: [t for t in study.trials if t.state.is_finished()]
    start = time.monotonic()
    with _StopAfterTrial() as stopper:
        while len(finished()) < trials and not stopper.requested:
            if timeout_s is not None and time.monotonic() - start >= timeout_s:
                log(f"search: time budget ({timeout_s:.0f}s) spent")
                break
            trial = study.ask()
            began, value, state, error = time.monotonic(), None, TrialState.FAIL, None
            try:
                overrides = {**sample(trial, space, cfg), "out": str(folder / "trials"),
                             "name": f"trial-{trial.number:03d}"}
                reporter = TrialReporter(trial)
                trial_cfg = resolve(folder / "base.yaml", overrides)
                result = train(trial_cfg, callbacks=[reporter], test=False)
                trial.set_user_attr("run", str(result.run_dir))
                value = saved_val_acc(trial_cfg, result.history)
                state = TrialState.PRUNED if reporter.pruned else TrialState.COMPLETE
            except GraftError as e:  # a bad combination or a diverged run: record it, go on
                error = str(e).splitlines()[0] if str(e) else type(e).__name__
            except KeyboardInterrupt:
                error, stopper.requested = "interrupted", True
            trial.set_user_attr("seconds", round(time.monotonic() - began, 2))
            if error:
                trial.set_user_attr("error", error)
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            _progress(study, trial.number, state, value, error, trials, timeout_s, start)
    return finish(study, folder, space, cfg, command, evaluate_run)


def _progress(study, number, state, value, error, trials, timeout_s, start) -> None:
    done = len([t for t in study.trials if t.state.is_finished()])
    best = _best(study)
    shown = f"{value:.4f}" if value is not None else "-"
    line = (f"trial {number}: {state.name.lower()} {shown}"
            + (f" ({error})" if error else "")
            + (f"  best {best.value:.4f} (trial {best.number})" if best is not None else "  no best yet")
            + f"  {done}/{trials} done")
    if timeout_s is not None:
        line += f"  {max(0.0, timeout_s - (time.monotonic() - start)):.0f}s left"
    log(line)


def _best(study):
    from optuna.trial import TrialState
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def finish(study, folder: Path, space: dict, base: RunConfig, command: str | None, evaluate_run) -> dict:
    """trials.csv/json, best.yaml, the best run's single test evaluation and search.json."""
    rows = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
             "seconds": t.user_attrs.get("seconds"), "error": t.user_attrs.get("error"),
             "run": t.user_attrs.get("run")} for t in study.trials]
    atomic_write_json(folder / "trials.json", rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["number"])
    writer.writeheader()
    writer.writerows([{**r, "params": json.dumps(r["params"])} for r in rows])
    atomic_write_text(folder / "trials.csv", text.getvalue())
    best = _best(study)
    summary = {"space": space, "trials_done": sum(r["state"] != "RUNNING" for r in rows),
               "best_trial": None, "params": None, "val_accuracy": None, "test_accuracy": None,
               "command": command}
    if best is None:
        log("[yellow]search: no trial completed[/]")
    else:
        run = Path(best.user_attrs["run"])
        # the trial's config with the base's out and name: a rerun lands beside other runs, not in trials/
        best_cfg = dataclasses.replace(resolve(run / "config.yaml"), out=base.out, name=base.name)
        save_yaml(best_cfg, folder / "best.yaml",
                  f"the best trial ({best.number}, validation accuracy {best.value:.4f}) of this search;\n"
                  f"`graft train --config best.yaml` reproduces it")
        # the test split is scored once, for the chosen trial only: selection saw validation alone
        evaluation = {} if (run / "evaluations").is_dir() else evaluate_run(run)
        test_acc = evaluation.get("accuracy") if evaluation else _read_test(run)
        summary.update(best_trial=best.number, params=best.params, val_accuracy=best.value,
                       test_accuracy=test_acc, run=str(run))
        log(f"search: best trial {best.number}, validation {best.value:.4f}, test "
            + (f"{test_acc:.4f}" if test_acc is not None else "-") + f" ({run})")
    atomic_write_json(folder / "search.json", summary)
    return summary


def _read_test(run: Path) -> float | None:
    """A resumed search whose best trial was already scored: read that evaluation back."""
    for f in sorted((run / "evaluations").glob("*/test_metrics.json")):
        return json.loads(f.read_text()).get("accuracy")
    return None


def parse_timeout(text: str | None) -> float | None:
    """30m, 2h, 90s or plain seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--timeout {text}: expected a positive duration like 90s, 30m, 2h or seconds")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def add_commands(sub) -> dict:
    from .options import add_train_flags, train_overrides
    p = sub.add_parser("search", help="hyperparameter search of the head on the frozen backbone (Optuna)",
                       description=__doc__.split("\n\n")[0])
    add_train_flags(p, exclude=("out", "name"), resume=False)
    p.add_argument("--space", metavar="YAML", help="search space (default: head widths, dropout, "
                   "optimizer, lr, weight decay, smoothing, batch size, epochs, flip views, features)")
    p.add_argument("--trials", type=int, default=20, help="trials in all, counting a resumed folder's (default: 20)")
    p.add_argument("--timeout", help="time budget: 90s, 30m, 2h or seconds (no new trial starts after it)")
    p.add_argument("--resume", metavar="DIR", help="continue a search folder with its saved config and space")
    p.add_argument("--out", default="runs", help="the search folder is OUT/NAME (default: runs)")
    p.add_argument("--name", help="default: search-<timestamp>")

    def cmd_search(args) -> None:
        import shlex
        import sys
        timeout_s = parse_timeout(args.timeout)
        command = "graft " + shlex.join(sys.argv[1:])
        if args.resume:
            given = [k for k, v in train_overrides(args).items() if v is not None and k not in ("out", "name")]
            if given or args.config or args.space:  # silently ignoring them would mislead
                raise ConfigError("--resume continues with the folder's saved base.yaml and space.yaml; "
                                  f"drop {', '.join(given) or '--config/--space'} (or start a new search)")
            run_search(None, None, args.resume, args.trials, timeout_s, resume=True, command=command)
            print(args.resume)
            return
        space = check_space(load_yaml(args.space)) if args.space else DEFAULT_SPACE
        # --out/--name place the search folder; the base config keeps --out (where best.yaml's rerun goes)
        cfg = resolve(args.config, {**train_overrides(args), "name": None})
        folder = Path(args.out) / (args.name or f"search-{time.strftime('%Y%m%d-%H%M%S')}")
        run_search(cfg, space, folder, args.trials, timeout_s, command=command)
        print(folder)
    return {"search": cmd_search}
