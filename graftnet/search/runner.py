"""The trial loop: ask Optuna for parameters, train the trial as an ordinary run, tell the result.
One loop per worker: in this process, in `workers` local processes, or on other machines that
joined the study's database; the totals are the study's, so they hold across all of them."""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import statistics
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
from .space import base_params, check_space, grid
from .storage import (GRACE_S, JOURNAL, STUDY, claim, counted, folder_lock, heartbeat, open_storage, quiet, recover,
                      shown)
from .trial import run_trial

DEFAULT_TRIALS = 20


class _StopAfterTrial:
    """The first Ctrl-C lets the running trial finish, then the search stops and writes its
    results; a second one interrupts the trial (it is recorded as failed)."""

    def __init__(self, speak: bool = True):
        self.requested, self.previous, self.speak = False, None, speak

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.speak:
            log("[yellow]stopping after this trial (Ctrl-C again to stop now)[/]")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def open_study(storage, settings: SearchSettings, create: bool = False, worker: int = 0, space: dict | None = None):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial says it all
    if create:
        optuna.create_study(study_name=STUDY, storage=storage, directions=settings.directions)
    # Reseeded with the trial count (a resumed study would replay its first draws) and the worker
    # (parallel workers would draw the same parameters).
    seed = (settings.seed + len(optuna.load_study(study_name=STUDY, storage=storage).trials) + 1000 * worker) % 2**32
    if settings.sampler == "grid":   # the grid's points are handed out through the storage: no repeats
        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, *args):
                """Optuna's stops the study when its grid is done, which only optimize() allows; this
                loop asks and tells, and stops at the study's total, which the grid's size bounds."""
        sampler = Grid(grid(space), seed=seed)
    else:
        sampler = (optuna.samplers.TPESampler(seed=seed) if settings.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=seed))
    # Optuna prunes single-objective studies only (Trial.report refuses several objectives)
    if settings.pruner == "none" or len(settings.directions) > 1:
        pruner = optuna.pruners.NopPruner()
    elif settings.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    else:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.load_study(study_name=STUDY, storage=storage, sampler=sampler, pruner=pruner)


def run_search(cfg: RunConfig | None, space: dict | None, folder: str | Path, trials: int | None = None,
               timeout_s: float | None = None, resume: bool = False, command: str | None = None,
               settings: SearchSettings | None = None, workers: int | None = None, test: bool = True) -> dict:
    """Run (or continue, with `resume`) a search in `folder` until its study holds `trials`
    finished trials (default 20, or the study's total on resume) or `timeout_s` has passed;
    returns what search.json holds and "stopped" (by Ctrl-C). `workers` overrides the saved
    settings' local worker count. `test=False`: the chosen trial is not scored on the test split (a
    caller that trains on from it scores only its own final model, once)."""
    folder = Path(folder)
    if resume:
        cfg, space, settings, storage = _reopen(folder)
        # a database may have workers on other machines: draw apart from them too
        study = open_study(storage, settings, worker=1 + os.getpid() % 4096 if settings.storage else 0,
                           space=space)
    else:
        settings = settings or SearchSettings(seed=cfg.train.seed)
        storage, study = _create(cfg, space, folder, settings)
    if trials is not None or "trials" not in study.user_attrs:  # the study's total: every worker reads it
        total = trials if trials is not None else DEFAULT_TRIALS
        if settings.sampler == "grid":   # each point once (and the base config, queued first, besides)
            points = math.prod(len(v) for v in grid(space).values()) + bool(base_params(space, cfg))
            if total > points:
                log(f"search: the grid has {points} trial(s); {total} asked, {points} run")
            total = min(total, points)
        study.set_user_attr("trials", total)
    deadline = time.time() + timeout_s if timeout_s is not None else None
    workers = workers or settings.workers
    if workers > 1 and settings.measures_latency:
        log("[yellow]search: latency is timed while the other workers train, so each trial's own timing "
            "is noisy; the front is chosen on timings taken again, in turns, once the trials end[/]")
    stopped = False   # by Ctrl-C (a search may also end before its time when trials must end by it)
    if workers > 1 and not any(t.state.is_finished() for t in study.get_trials(deepcopy=False)):
        # the first trial alone, with every core: it fills the feature cache that all the others read,
        # where N workers would each run the same backbone pass on 1/N of the cores
        first = _work(study, storage, folder, cfg, space, settings, deadline, limit=1)
        if first != "done":
            workers, stopped = 0, first == "stopped"   # no workers, and no second loop either
    if workers > 1:
        stopped = _run_workers(folder, workers, deadline)
    # after local workers, this process goes on alone: it runs the retries of any worker that died
    if workers and not stopped:
        stopped = _work(study, storage, folder, cfg, space, settings, deadline) == "stopped"
    from ..evaluation import evaluate_run
    return {**finish(study, folder, space, cfg, command, evaluate_run, test=test), "stopped": stopped}


def _reopen(folder: Path):
    import optuna
    if not (folder / "base.yaml").is_file():
        raise GraftError(f"{folder}: not a search folder (no base.yaml and space.yaml); nothing to resume")
    cfg, space = resolve(folder / "base.yaml"), check_space(load_yaml(folder / "space.yaml"))
    settings = SearchSettings.load(folder)
    if settings.storage is None and not (folder / JOURNAL).is_file():
        raise GraftError(f"{folder}: not a search folder (no {JOURNAL}); nothing to resume")
    storage = open_storage(folder, settings.storage)
    if STUDY not in optuna.get_all_study_names(storage):
        raise GraftError(f"{folder}: its storage {shown(settings.storage or JOURNAL)} holds no search to resume")
    return cfg, space, settings, storage


def _create(cfg: RunConfig, space: dict, folder: Path, settings: SearchSettings):
    import optuna
    check_space(space)
    if settings.sampler == "grid":
        grid(space)   # a space without a finite grid: one line, before any folder exists
    if folder.exists() and any(folder.iterdir()):
        raise GraftError(f"{folder}: exists and is not empty; continue it with --resume or pick --name")
    if settings.storage:  # reached and checked before anything is created
        storage = open_storage(folder, settings.storage)
        if STUDY in optuna.get_all_study_names(storage):
            raise GraftError(f"--storage {shown(settings.storage)}: already holds a search; join it with "
                             "--join URL, or give each search its own database")
    folder.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, folder / "base.yaml", "the base config every trial starts from")
    atomic_write_text(folder / "space.yaml", yaml.safe_dump(space, sort_keys=False))
    settings.save(folder)
    if not settings.storage:
        storage = open_storage(folder, None)
    study = open_study(storage, settings, create=True, space=space)
    # what a worker on another machine needs besides the URL and the data
    shared = {"workers": 1, "storage": None}  # each machine's own
    for key, value in {"name": folder.name, "base": load_yaml(folder / "base.yaml"), "space": space,
                       "settings": dataclasses.asdict(settings) | shared}.items():
        study.set_user_attr(key, value)
    # the user's own configuration is trial 0 when the space holds it: what the search must beat,
    # marked on the plots; TPE learns from it as from any trial
    params = base_params(space, cfg)
    if params:
        study.enqueue_trial(params, user_attrs={"label": "base config"})
    return storage, study


def _work(study, storage, folder: Path, cfg, space, settings, deadline, speak: bool = True,
          limit: int | None = None) -> str:
    """One worker's loop: 'done' (the study holds its total, or this call ran `limit` trials),
    'budget' (time spent) or 'stopped' (Ctrl-C)."""
    import torch
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    oom = (MemoryError,) + ((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ())
    with _StopAfterTrial(speak) as stopper:
        ran = 0
        while not stopper.requested:
            if limit is not None and ran >= limit:
                return "done"
            ran += 1
            if deadline is not None and time.time() + _typical_s(study, settings) >= deadline:
                if speak:
                    log("search: time budget spent")
                return "budget"
            with folder_lock(folder):  # count and ask as one step: no worker starts one trial too many
                recover(study, storage)
                total, every = study.user_attrs.get("trials", DEFAULT_TRIALS), study.get_trials(deepcopy=False)
                if len(counted(every)) + sum(t.state == TrialState.RUNNING for t in every) >= total:
                    return "done"
                with quiet():
                    trial = study.ask()
                claim(trial)
            began, values, state, error = time.monotonic(), None, TrialState.FAIL, None
            try:
                with heartbeat(storage, trial):
                    try:
                        outcome = run_trial(trial, folder, cfg, space, settings)
                        trial.set_user_attr("run", str(outcome.run))
                        for k, v in outcome.attrs.items():
                            trial.set_user_attr(k, v)
                        values = outcome.values
                        state = TrialState.PRUNED if outcome.pruned else TrialState.COMPLETE
                    except GraftError as e:  # a bad combination or a diverged run: record it, go on
                        error = str(e).splitlines()[0] if str(e) else type(e).__name__
                    except oom as e:
                        error = "out of memory" + (f" ({str(e).splitlines()[0]})" if str(e) else "")
                    except KeyboardInterrupt:
                        error, stopper.requested = "interrupted", True
                    trial.set_user_attr("seconds", round(time.monotonic() - began, 2))
                    if error:
                        trial.set_user_attr("error", error)
                    study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
            except UpdateFinishedTrialError:  # failed meanwhile by a worker that heard no heartbeat
                log(f"trial {trial.number}: taken for dead by another worker (no heartbeat for {GRACE_S}s); "
                    "its result is dropped, its retry counts")
                continue
            _progress(study, trial.number, state, values[0] if values else None, error, deadline)
    return "stopped"


def _typical_s(study, settings: SearchSettings) -> float:
    """The median finished trial's seconds when trials must end by the deadline, else 0."""
    if not settings.end_by_deadline:
        return 0.0
    seconds = [t.user_attrs["seconds"] for t in study.get_trials(deepcopy=False)
               if t.state.is_finished() and "seconds" in t.user_attrs]
    return statistics.median(seconds) if seconds else 0.0


def _worker(folder: str, index: int, workers: int, deadline: float | None) -> None:
    """A local worker process, out of the terminal's reach (setsid): Ctrl-C reaches the parent,
    which passes it on, so that every worker hears each Ctrl-C exactly once however the parent got it."""
    import sys
    import torch
    os.setsid()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
    folder_ = Path(folder)
    try:
        cfg, space = resolve(folder_ / "base.yaml"), load_yaml(folder_ / "space.yaml")
        settings = SearchSettings.load(folder_)
        storage = open_storage(folder_, settings.storage)
        _work(open_study(storage, settings, worker=index + 1, space=space), storage, folder_, cfg, space, settings,
              deadline, speak=False)
    except GraftError as e:
        log(f"[bold red]error:[/] search worker {index}: {e}")
        sys.exit(2)


def _run_workers(folder: Path, workers: int, deadline: float | None) -> bool:
    """Runs `workers` local worker processes to their end; True when Ctrl-C stopped them."""
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's threads in whatever state
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # until they can listen
    try:
        procs = [ctx.Process(target=_worker, args=(str(folder), i, workers, deadline), name=f"search-worker-{i}")
                 for i in range(workers)]
        for p in procs:
            p.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    heard = []

    def forward(signum, frame):
        heard.append(signum)
        if len(heard) == 1:
            log("[yellow]stopping after the running trials (Ctrl-C again to stop them now)[/]")
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, forward) if main else None
    try:
        for p in procs:
            p.join()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    ended = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode]
    if ended:
        log(f"[yellow]search: {', '.join(ended)} ended early[/]")
    return bool(heard)


def _progress(study, number, state, value, error, deadline) -> None:
    done, total = len(counted(study.get_trials(deepcopy=False))), study.user_attrs.get("trials", DEFAULT_TRIALS)
    best = best_trial(study)
    shown_ = f"{value:.4f}" if value is not None else "-"
    line = (f"trial {number}: {state.name.lower()} {shown_}"
            + (f" ({error})" if error else "")
            + (f"  best {best.values[0]:.4f} (trial {best.number})" if best is not None else "  no best yet")
            + f"  {done}/{total} done")
    if deadline is not None:
        line += f"  {max(0.0, deadline - time.time()):.0f}s left"
    log(line)
