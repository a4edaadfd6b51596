"""What a search leaves: trials.csv/json, best.yaml, the chosen run's single test evaluation, search.json."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

from ..config import RunConfig, resolve, save_yaml
from ..io import atomic_write_json, atomic_write_text
from ..progress import log


def best_trial(study):
    from optuna.trial import TrialState
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: (t.values[0], -t.number)) if done else None


def finish(study, folder: Path, space: dict, base: RunConfig, command: str | None, evaluate_run) -> dict:
    """trials.csv/json, best.yaml, the best run's single test evaluation and search.json."""
    rows = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.values[0] if t.values else None,
             "seconds": t.user_attrs.get("seconds"), "error": t.user_attrs.get("error"),
             "run": t.user_attrs.get("run")} for t in study.trials]
    atomic_write_json(folder / "trials.json", rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["number"])
    writer.writeheader()
    writer.writerows([{**r, "params": json.dumps(r["params"])} for r in rows])
    atomic_write_text(folder / "trials.csv", text.getvalue())
    best = best_trial(study)
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
                  f"the best trial ({best.number}, validation accuracy {best.values[0]:.4f}) of this search;\n"
                  f"`graft train --config best.yaml` reproduces it")
        # the test split is scored once, for the chosen trial only: selection saw validation alone
        evaluation = {} if (run / "evaluations").is_dir() else evaluate_run(run)
        test_acc = evaluation.get("accuracy") if evaluation else _read_test(run)
        summary.update(best_trial=best.number, params=best.params, val_accuracy=best.values[0],
                       test_accuracy=test_acc, run=str(run))
        log(f"search: best trial {best.number}, validation {best.values[0]:.4f}, test "
            + (f"{test_acc:.4f}" if test_acc is not None else "-") + f" ({run})")
    atomic_write_json(folder / "search.json", summary)
    return summary


def _read_test(run: Path) -> float | None:
    """A resumed search whose best trial was already scored: read that evaluation back."""
    for f in sorted((run / "evaluations").glob("*/test_metrics.json")):
        return json.loads(f.read_text()).get("accuracy")
    return None


