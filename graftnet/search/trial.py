"""One trial: the sampled parameters applied to the base config, trained as an ordinary run, and
the numbers the study is told (validation accuracy first, then latency and size when asked).

Besides config keys a space may hold STEPS, what happens to the trained model before it is judged:
    prune.amount: {type: float, low: 0.1, high: 0.5, zero: true}
                                # structured channel pruning of the trained run (`graft prune`, with
                                # prune.finetune_epochs recovery epochs, default 1), scored on the
                                # validation split only: the pruned run is the trial's
    export.int8: {type: bool}   # the int8 ONNX model is what the trial ships: its validation accuracy
                                # and its latency are the trial's (after pruning, when both are asked)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, resolve
from ..errors import GraftError
from ..train.loop import Callback
from .settings import SearchSettings
from .space import STEPS, sample


@dataclass
class Outcome:
    values: list[float]          # in the order of settings.objectives
    pruned: bool                 # stopped early by the pruner: reported, not a finished value
    run: Path
    attrs: dict = field(default_factory=dict)   # every measured number, kept with the trial


class TrialReporter(Callback):
    """Reports each epoch's validation accuracy to the trial and ends the fit early when the
    pruner (median of earlier trials at the same epoch) says this trial will not win."""

    def __init__(self, trial):
        self.trial, self.pruned, self.step = trial, False, 0
        # Optuna prunes single-objective studies only (Trial.report refuses several objectives)
        self.reports = len(getattr(getattr(trial, "study", None), "directions", [None])) == 1

    def after_epoch(self, state, row: dict) -> None:
        acc = row.get("val_acc")
        if acc is None or acc != acc:  # no validation split, or NaN: nothing to choose trials by
            raise GraftError("search: trials are chosen on validation accuracy; the data has no "
                             "validation split (set data.val_fraction > 0)")
        self.step += 1
        if not self.reports:
            return
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


def run_trial(trial, folder: Path, base: RunConfig, space: dict, settings: SearchSettings) -> Outcome:
    """Train the trial under SEARCH/trials/trial-NNN; raises GraftError for a bad combination or a
    diverged run (the runner records it and goes on)."""
    from ..train.pipeline import train
    chosen = sample(trial, space, base)
    steps = {k: chosen.pop(k) for k in list(chosen) if k in STEPS}
    overrides = {**chosen, "out": str(folder / "trials"), "name": f"trial-{trial.number:03d}"}
    reporter = TrialReporter(trial)
    cfg = resolve(folder / "base.yaml", overrides)
    result = train(cfg, callbacks=[reporter], test=False)
    acc, run = saved_val_acc(cfg, result.history), Path(result.run_dir)
    attrs = {"val_acc": acc}
    if steps.get("prune.amount") and not reporter.pruned:
        run, acc = _prune(run, steps, cfg, attrs)
    int8 = bool(steps.get("export.int8"))
    if not reporter.pruned and (settings.measures_latency or int8 or "size_mb" in settings.objectives):
        from .measure import measure_run
        attrs.update(measure_run(run, int8, settings.latency_batch))
        if int8:  # the shipped model is the int8 one: it is judged by its own accuracy
            attrs["val_acc_fp32"], acc = acc, attrs.pop("val_acc_int8")
            attrs["val_acc"] = acc
    values = [acc] + [attrs[o] for o in settings.objectives[1:]]
    return Outcome(values=values, pruned=reporter.pruned, run=run, attrs=attrs)


def _prune(run: Path, steps: dict, cfg: RunConfig, attrs: dict) -> tuple[Path, float]:
    """The trial's run pruned into its own folder beside it (validation only); that run is the
    trial's from here on. Fills attrs with the unpruned and pruned numbers."""
    import json
    from ..compress.prune import PruneSettings, prune_run
    settings = PruneSettings(amount=float(steps["prune.amount"]), seed=cfg.train.seed,
                             finetune_epochs=int(steps.get("prune.finetune_epochs", STEPS["prune.finetune_epochs"][1])))
    pruned = prune_run(run, settings, out=str(run.parent), name=f"{run.name}-pruned", test=False)
    record = json.loads((pruned / "prune.json").read_text())
    attrs.update(val_acc_unpruned=attrs["val_acc"], val_acc=record["after"]["val_acc"],
                 weights=record["after"]["params"], weights_unpruned=record["before"]["params"],
                 macs=record["after"]["macs"], macs_unpruned=record["before"]["macs"])
    return pruned, record["after"]["val_acc"]
