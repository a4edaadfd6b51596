"""Which embedded storage a search's parallel workers share: Optuna's journal file or SQLite.

    python bench/search_storage.py [--workers 4] [--trials 50] [--repeats 3] [--url postgresql://...]

Each of `workers` processes opens the study the way `graft search` does (graftnet.search.storage)
and runs `trials` trivial trials, each with the writes a real trial makes (ask, three parameters,
the worker's name, two reported epochs, tell), with no lock of our own around them. Counts the
errors each storage raised ("database is locked" is SQLite's), the trials lost (fewer finished
than asked for) and the wall time. `--url` adds a database server to the comparison. Offline, a
few seconds. Writes bench/results/search_storage.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from record import commit, machine  # noqa: E402
sys.path.insert(0, str(ROOT))

from graftnet.search.storage import claim, open_storage  # noqa: E402

STUDY = "bench"


def worker(folder: str, url: str | None, trials: int, ready, go, queue) -> None:
    import warnings
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
    errors: collections.Counter = collections.Counter()
    study = None
    try:  # the random sampler: the storage's cost, not TPE's, on 2 cores shared by 4 workers
        study = optuna.load_study(study_name=STUDY, storage=open_storage(Path(folder), url),
                                  sampler=optuna.samplers.RandomSampler())
    except Exception as e:  # noqa: BLE001 - counted, not hidden
        errors[f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"] += trials
    ready.release()
    go.wait()
    for _ in range(trials if study else 0):
        try:
            trial = study.ask()
            x = trial.suggest_float("x", 1e-4, 1.0, log=True)
            trial.suggest_int("n", 1, 8)
            trial.suggest_categorical("c", ["a", "b"])
            claim(trial)
            trial.report(x, 1)
            trial.report(x / 2, 2)
            study.tell(trial, x)
        except Exception as e:  # noqa: BLE001 - counted, not hidden
            errors[f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"] += 1
    queue.put(dict(errors))


def one_run(name: str, url_for, workers: int, trials: int) -> dict:
    import optuna
    from optuna.trial import TrialState
    with tempfile.TemporaryDirectory() as tmp:
        url = url_for(tmp)
        storage = open_storage(Path(tmp), url)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        optuna.create_study(study_name=STUDY, storage=storage)
        ctx = mp.get_context("spawn")
        ready, go, queue = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=worker, args=(tmp, url, trials, ready, go, queue)) for _ in range(workers)]
        for p in procs:
            p.start()
        for _ in procs:  # timed from here: the workers' start (imports) is not the storage's cost
            ready.acquire()
        start = time.perf_counter()
        go.set()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        seconds = time.perf_counter() - start
        errors: collections.Counter = collections.Counter()
        for r in results:
            errors.update(r)
        states = collections.Counter(t.state.name for t in optuna.load_study(study_name=STUDY, storage=storage).trials)
        if url and url.startswith("postgresql"):
            optuna.delete_study(study_name=STUDY, storage=storage)
        return {"seconds": round(seconds, 3), "errors": sum(errors.values()), "error_kinds": dict(errors),
                "complete": states.get(TrialState.COMPLETE.name, 0), "states": dict(states),
                "lost": workers * trials - states.get(TrialState.COMPLETE.name, 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=50, help="per worker")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--url", help="also a database server, e.g. postgresql://USER@127.0.0.1:PORT/DB (emptied)")
    args = ap.parse_args()
    storages = {"journal": lambda tmp: None, "sqlite": lambda tmp: f"sqlite:///{tmp}/study.db"}
    if args.url:
        storages["server"] = lambda tmp: args.url
    out = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(), "commit": commit(),
           # other work on the machine spreads the times: the load says how much there was
           "load_average_1min_before": round(os.getloadavg()[0], 2),
           "workers": args.workers, "trials_per_worker": args.trials, "repeats": args.repeats, "storages": {}}
    for name, url_for in storages.items():
        runs = [one_run(name, url_for, args.workers, args.trials) for _ in range(args.repeats)]
        secs = [r["seconds"] for r in runs]
        out["storages"][name] = {
            "seconds_mean": round(statistics.mean(secs), 3),
            "seconds_spread": round(statistics.stdev(secs), 3) if len(secs) > 1 else 0.0,
            "trials_per_second": round(args.workers * args.trials / statistics.mean(secs), 1),
            "errors": [r["errors"] for r in runs], "lost": [r["lost"] for r in runs], "runs": runs}
        s = out["storages"][name]
        print(f"{name:8s} {s['seconds_mean']:.2f} ± {s['seconds_spread']:.2f} s  "
              f"{s['trials_per_second']} trials/s  errors {s['errors']}  lost {s['lost']}")
    base = out["storages"]["journal"]["seconds_mean"]
    out["time_vs_journal"] = {k: round(v["seconds_mean"] / base, 2) for k, v in out["storages"].items()}
    out["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    dest = ROOT / "bench" / "results" / "search_storage.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(dest)


if __name__ == "__main__":
    main()
