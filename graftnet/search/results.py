"""What a search leaves: trials.csv/json, best.yaml, search.json, plots and report.html, and one
test evaluation for each chosen run: the best trial's, and with several objectives every Pareto
front member's. Selection sees validation alone, so these test numbers are not themselves chosen."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

from ..config import RunConfig, resolve, save_yaml
from ..io import atomic_write_json, atomic_write_text
from ..progress import log
from .settings import SearchSettings

SELECTION = "selected on validation; test scored once for the chosen model(s)"


def measure(t, name: str, objectives: list[str] | None = None, retimed: dict | None = None):
    """An objective's value as the study was told it, else the number the trial measured
    (pruned and failed trials have no values, but may have measured attrs); latency as `retimed`
    ({trial number: ms}, measure.retime) gives it, where it does."""
    if name == "latency_ms" and retimed and t.number in retimed:
        return retimed[t.number]
    if t.values and objectives and name in objectives:
        return t.values[objectives.index(name)]
    value = t.user_attrs.get(name)
    if value is None and name == "val_acc" and t.intermediate_values:  # pruned: its last report
        value = t.intermediate_values[max(t.intermediate_values)]
    return value


def feasible(t, max_latency_ms: float | None, objectives: list[str] | None = None,
             retimed: dict | None = None) -> bool:
    """Within the latency constraint; a trial without a latency is not known to meet it."""
    if max_latency_ms is None:
        return True
    latency = measure(t, "latency_ms", objectives, retimed)
    return latency is not None and latency <= max_latency_ms


def best_trial(study, max_latency_ms: float | None = None):
    """The most accurate complete (and feasible) trial; the earlier one on a tie."""
    from optuna.trial import TrialState
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and feasible(t, max_latency_ms)]
    return max(done, key=lambda t: (t.values[0], -t.number)) if done else None


def pareto_front(trials: list, key) -> list:
    """The trials no other one dominates; `key(t)` is a tuple in which larger is better everywhere.
    Computed here, not taken from Optuna's study.best_trials, because that front is over all trials:
    a feasible trial dominated only by an infeasible one belongs to the feasible front."""
    keys = {t.number: key(t) for t in trials}
    beats = lambda a, b: a != b and all(x >= y for x, y in zip(a, b))
    return [t for t in trials if not any(beats(keys[o.number], keys[t.number]) for o in trials)]


@dataclasses.dataclass
class Choice:
    feasible: list         # complete trials within the latency constraint (all complete ones without it)
    front: list            # the Pareto front of `feasible`, most accurate first; [] with one objective
    best: object | None    # the most accurate feasible trial: best.yaml


def choose(study, settings: SearchSettings, retimed: dict | None = None) -> Choice:
    """The feasible trials, their front and the best; latency as `retimed` gives it, where it does."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    objectives, limit = settings.objectives, settings.max_latency_ms
    ok = [t for t in study.trials if t.state == TrialState.COMPLETE and feasible(t, limit, objectives, retimed)]
    front = []
    if len(study.directions) > 1:
        signs = [1 if d == StudyDirection.MAXIMIZE else -1 for d in study.directions]
        front = pareto_front(ok, lambda t: tuple(s * measure(t, o, objectives, retimed)
                                                 for s, o in zip(signs, objectives)))
        front.sort(key=lambda t: (-t.values[0], t.number))
    best = max(front or ok, key=lambda t: (t.values[0], -t.number)) if ok else None
    return Choice(ok, front, best)


def trial_rows(study, settings: SearchSettings, choice: Choice, retimed: dict | None = None) -> list[dict]:
    """One row per trial: the objectives' values and every attr the trial measured as columns
    (latency_ms as `retimed` gives it where it does, latency_ms_trial as the trial timed it)."""
    fixed = ("number", "state", "params", "value", *settings.objectives, "seconds", "error", "run")
    extra = list(dict.fromkeys(k for t in study.trials for k in t.user_attrs if k not in fixed))
    ok, front = {t.number for t in choice.feasible}, {t.number for t in choice.front}
    rows = []
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name, "params": t.params,
               "value": t.values[0] if t.values else None}
        row.update({o: measure(t, o, settings.objectives, retimed) for o in settings.objectives})
        row.update({k: t.user_attrs.get(k) for k in extra})
        if retimed:
            row["latency_ms"] = measure(t, "latency_ms", settings.objectives, retimed)
            row["latency_ms_trial"] = measure(t, "latency_ms", settings.objectives)
        if settings.max_latency_ms is not None:
            row["feasible"] = t.number in ok
        if len(settings.objectives) > 1:
            row["pareto"] = t.number in front
        row.update({k: t.user_attrs.get(k) for k in ("seconds", "error", "run")})
        rows.append(row)
    return rows


def finish(study, folder: Path, space: dict, base: RunConfig, command: str | None, evaluate_run,
           settings: SearchSettings | None = None, test: bool = True) -> dict:
    """trials.csv/json, best.yaml, the chosen runs' single test evaluations (none with `test=False`),
    search.json, plots and report.html. `settings` default to the folder's search.yaml."""
    from optuna.trial import TrialState
    folder = Path(folder)
    settings = settings or SearchSettings.load(folder)
    retimed = _retime(study, settings)
    choice = choose(study, settings, retimed)
    rows = trial_rows(study, settings, choice, retimed)
    atomic_write_json(folder / "trials.json", rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["number"])
    writer.writeheader()
    # dicts and lists (params, a worker's host and pid) as JSON, not Python's repr
    writer.writerows([{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows])
    atomic_write_text(folder / "trials.csv", text.getvalue())

    states = {s.name: sum(t.state == s for t in study.trials) for s in TrialState}
    starts = [t.datetime_start for t in study.trials if t.datetime_start]
    ends = [t.datetime_complete for t in study.trials if t.datetime_complete]
    # finished only: neither the running trials nor the queued ones (a labelled base config waits)
    summary = {"space": space, "trials_done": sum(t.state.is_finished() for t in study.trials),
               "best_trial": None, "params": None, "val_accuracy": None, "test_accuracy": None, "run": None,
               "command": command, "objectives": settings.objectives, "max_latency_ms": settings.max_latency_ms,
               "selection": SELECTION, "states": {k: v for k, v in states.items() if v},
               "trial_seconds": round(sum(t.user_attrs.get("seconds") or 0 for t in study.trials), 2),
               "span_seconds": round((max(ends) - min(starts)).total_seconds(), 2) if starts and ends else None,
               "feasible_trials": len(choice.feasible), "no_feasible": None, "pareto": None,
               "latency_retimed": bool(retimed)}
    scored: dict[str, float | None] = {}  # the best trial is also on the front: one evaluation each

    def test_accuracy(t) -> float | None:
        run = t.user_attrs.get("run")
        if run is not None and run not in scored and test:
            here = Path(run, "config.yaml").is_file()
            # a trial that ships its int8 model is scored as shipped: the int8 ONNX model on the test split
            model = t.user_attrs.get("model") if t.user_attrs.get("int8") else None
            scored[run] = None if not here else _score_onnx(Path(run), Path(model)) if model else \
                _score(Path(run), evaluate_run)
        return scored.get(run)

    complete = states.get("COMPLETE", 0)
    if choice.best is None and settings.max_latency_ms is not None and complete:
        fastest = min((v for t in study.trials if t.state == TrialState.COMPLETE
                       if (v := measure(t, "latency_ms", settings.objectives, retimed)) is not None), default=None)
        summary["no_feasible"] = (f"no complete trial meets max_latency_ms {settings.max_latency_ms:g}"
                                  + (f" (the fastest took {fastest:.3g} ms)" if fastest is not None else "")
                                  + "; no best.yaml written")
        log(f"[yellow]search: {summary['no_feasible']}[/]")
    elif choice.best is None:
        log("[yellow]search: no trial completed[/]")
    best = choice.best
    run = Path(best.user_attrs["run"]) if best is not None else None
    if best is not None and not (run / "config.yaml").is_file():
        # a trial of a shared study that ran on another machine: its run folder is there
        host = (best.user_attrs.get("worker") or {}).get("host", "another machine")
        summary.update(best_trial=best.number, params=best.params, val_accuracy=best.values[0], run=str(run))
        log(f"[yellow]search: the best trial ({best.number}) ran on {host}; its run folder {run} is not "
            "here: best.yaml and its test score come from the search folder on that machine[/]")
    elif best is not None:
        # the trial's config with the base's out and name: a rerun lands beside other runs, not in trials/
        best_cfg = dataclasses.replace(resolve(run / "config.yaml"), out=base.out, name=base.name)
        save_yaml(best_cfg, folder / "best.yaml",
                  f"the best trial ({best.number}, validation accuracy {best.values[0]:.4f}) of this search"
                  + (f", the most accurate within {settings.max_latency_ms:g} ms" if settings.max_latency_ms else "")
                  + ";\n`graft train --config best.yaml` reproduces it"
                  + _steps_note(best))
        test_acc = test_accuracy(best)
        summary.update(best_trial=best.number, params=best.params, val_accuracy=best.values[0],
                       test_accuracy=test_acc, run=str(run))
        log(f"search: best trial {best.number}, validation {best.values[0]:.4f}, test "
            + (f"{test_acc:.4f}" if test_acc is not None else "-") + f" ({run})")
    if len(settings.objectives) > 1:
        summary["pareto"] = [{"number": t.number, "params": t.params,
                              **{k: measure(t, k, settings.objectives, retimed) for k in ("val_acc", "latency_ms", "size_mb")},
                              "latency_ms_trial": measure(t, "latency_ms", settings.objectives),
                              "label": t.user_attrs.get("label"), "run": t.user_attrs.get("run"),
                              "test_accuracy": test_accuracy(t)}
                             for t in choice.front]
        log(f"search: Pareto front of {len(choice.front)} trial(s): "
            + ", ".join(str(t.number) for t in choice.front) + f"; {SELECTION}")
    atomic_write_json(folder / "search.json", summary)
    from .report import write_search_report
    write_search_report(folder, study, settings, summary, rows)
    return summary


def _retime(study, settings: SearchSettings) -> dict:
    """{trial number: ms}: every complete trial's shipped model timed again, in turns (measure.retime),
    when latency is an objective or a constraint and at least two such models are here; {} otherwise,
    and when some are on other machines (a shared study): the trials' own timings then stand, since
    two kinds of timing would not compare."""
    from optuna.trial import TrialState
    if not settings.measures_latency:
        return {}
    models = {t.number: Path(t.user_attrs["model"]) for t in study.trials
              if t.state == TrialState.COMPLETE and t.user_attrs.get("model")}
    away = [n for n, m in models.items() if not m.is_file()]
    if away:
        log(f"search: {len(away)} trial(s)' models are not on this machine; the front uses each trial's own timing")
        return {}
    if len(models) < 2:
        return {}
    from .measure import retime
    log(f"search: timing {len(models)} trials' models again, in turns, for the front")
    return retime(models, settings.latency_batch)


def _steps_note(trial) -> str:
    """What best.yaml's run needs after `graft train` to be the trial's model: its steps, as commands."""
    note = ""
    if trial.user_attrs.get("weights_unpruned"):   # pruned: the trial's prune step's settings
        amount, epochs = trial.params.get("prune.amount"), trial.params.get("prune.finetune_epochs")
        note += (f"; it is pruned: then `graft prune RUN --amount {amount:g}"
                 + (f" --finetune-epochs {epochs}`" if epochs is not None else "`"))
    if trial.user_attrs.get("int8"):
        note += "; it ships int8: then `graft quantize " + ("PRUNED_RUN`" if note else "RUN`")
    return note


def _score(run: Path, evaluate_run) -> float | None:
    # a resumed search finds its chosen runs already scored: the test split is never scored twice
    evaluation = {} if (run / "evaluations").is_dir() else evaluate_run(run)
    return evaluation.get("accuracy") if evaluation else _read_test(run)


def _score_onnx(run: Path, model: Path) -> float | None:
    """The test accuracy of a run's exported (int8) model, written beside it once and read back after."""
    done = model.with_suffix(".test.json")
    if done.is_file():
        return json.loads(done.read_text()).get("accuracy")
    from ..export.quantize import held_out_images
    from ..export.runtime import evaluate_onnx
    from ..model import load_model
    _, spec = load_model(run)
    images = held_out_images(resolve(run / "config.yaml"), spec)
    if images is None:
        return None
    result = evaluate_onnx(model, images)
    atomic_write_json(done, {"accuracy": result["accuracy"], "n": result["n"], "model": str(model)})
    return result["accuracy"]


def _read_test(run: Path) -> float | None:
    """A resumed search whose chosen trial was already scored: read that evaluation back."""
    for f in sorted((run / "evaluations").glob("*/test_metrics.json")):
        return json.loads(f.read_text()).get("accuracy")
    return None
