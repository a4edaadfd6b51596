"""The trial loop: ask Optuna for parameters, train the trial as an ordinary run, tell the result."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import yaml

from ..config import RunConfig, load_yaml, resolve, save_yaml
from ..errors import GraftError
from ..io import atomic_write_text
from ..progress import log
from .results import best_trial, finish
from .settings import SearchSettings
from .space import check_space
from .trial import run_trial

STUDY = "graft-search"   # one study per search folder: the fixed name is what --resume loads

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


def open_study(folder: Path, settings: SearchSettings, load: bool):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says it all
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "study.journal")))
    # A resumed study reseeds with the trial count: the same seed would replay the first trials' draws.
    done = len(optuna.load_study(study_name=STUDY, storage=storage).trials) if load else 0
    return optuna.create_study(study_name=STUDY, storage=storage, directions=settings.directions,
                               load_if_exists=load, sampler=optuna.samplers.TPESampler(seed=settings.seed + done),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))


def run_search(cfg: RunConfig | None, space: dict | None, folder: str | Path, trials: int = 20,
               timeout_s: float | None = None, resume: bool = False, command: str | None = None,
               settings: SearchSettings | None = None) -> dict:
    """Run (or continue, with `resume`) a search in `folder` until it holds `trials` finished
    trials or `timeout_s` has passed; returns what search.json holds."""
    from optuna.trial import TrialState
    from ..evaluation import evaluate_run
    folder = Path(folder)
    if resume:
        if not (folder / "study.journal").is_file() or not (folder / "base.yaml").is_file():
            raise GraftError(f"{folder}: not a search folder (no study.journal and base.yaml); nothing to resume")
        cfg, space = resolve(folder / "base.yaml"), check_space(load_yaml(folder / "space.yaml"))
        settings = SearchSettings.load(folder)
    else:
        check_space(space)
        if folder.exists() and any(folder.iterdir()):
            raise GraftError(f"{folder}: exists and is not empty; continue it with --resume or pick --name")
        folder.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, folder / "base.yaml", "the base config every trial starts from")
        atomic_write_text(folder / "space.yaml", yaml.safe_dump(space, sort_keys=False))
        settings = settings or SearchSettings(seed=cfg.train.seed)
        settings.save(folder)
    study = open_study(folder, settings, resume)
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
            began, values, state, error = time.monotonic(), None, TrialState.FAIL, None
            try:
                outcome = run_trial(trial, folder, cfg, space, settings)
                trial.set_user_attr("run", str(outcome.run))
                for k, v in outcome.attrs.items():
                    trial.set_user_attr(k, v)
                values = outcome.values
                state = TrialState.PRUNED if outcome.pruned else TrialState.COMPLETE
            except GraftError as e:  # a bad combination or a diverged run: record it, go on
                error = str(e).splitlines()[0] if str(e) else type(e).__name__
            except KeyboardInterrupt:
                error, stopper.requested = "interrupted", True
            trial.set_user_attr("seconds", round(time.monotonic() - began, 2))
            if error:
                trial.set_user_attr("error", error)
            study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
            _progress(study, trial.number, state, values[0] if values else None, error, trials, timeout_s, start)
    return finish(study, folder, space, cfg, command, evaluate_run)


def _progress(study, number, state, value, error, trials, timeout_s, start) -> None:
    done = len([t for t in study.trials if t.state.is_finished()])
    best = best_trial(study)
    shown = f"{value:.4f}" if value is not None else "-"
    line = (f"trial {number}: {state.name.lower()} {shown}"
            + (f" ({error})" if error else "")
            + (f"  best {best.values[0]:.4f} (trial {best.number})" if best is not None else "  no best yet")
            + f"  {done}/{trials} done")
    if timeout_s is not None:
        line += f"  {max(0.0, timeout_s - (time.monotonic() - start)):.0f}s left"
    log(line)


