"""Where a search's study lives, and how the workers that share it stay honest with each other.

Without `--storage` the study is Optuna's journal file SEARCH/study.journal: append-only, written
under a file lock, for the workers of one machine. Under 4 parallel workers it ran trivial trials
2.6x faster than SQLite, and neither raised an error or lost a trial (bench/search_storage.py). `--storage URL` puts it in a database, PostgreSQL for
workers on several machines. Either way a worker that dies mid-trial leaves a RUNNING trial behind:
the others fail it and queue its parameters again, found by the worker's pid on this host (every
storage) or by a missed heartbeat (databases, any host). A machine joins a database's search with
nothing but the URL (and the data): the study holds the base config, space and settings.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import os
import socket
import threading
import warnings
from pathlib import Path

import yaml

from ..config import apply_overrides, check_folder_name, load_yaml, resolve
from ..errors import GraftError
from ..io import atomic_write_text
from .settings import SearchSettings

STUDY = "graft-search"   # one study per search folder or database: the fixed name is what a worker loads
JOURNAL = "study.journal"
HEARTBEAT_S, GRACE_S = 10, 60   # a database trial silent for GRACE_S is taken for dead
RETRIES = 2                     # a trial that kills its worker every time is not retried forever
HOST = socket.gethostname()


def shown(url: str) -> str:
    """The URL as errors and logs print it: without its password."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: the caller's error says so
        return url


def open_storage(folder: Path, url: str | None, flag: str = "--storage"):
    """The study's storage; a URL that cannot be reached is one GraftError line (naming `flag`),
    nothing created."""
    import optuna
    if url is None:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(Path(folder) / JOURNAL)))
    import sqlalchemy.exc
    where = f"{flag} {shown(url)}"
    # a server that drops packets would hold the first connection for minutes; a worker that
    # outlives a server restart finds its pooled connections dead
    engine = {"pool_pre_ping": True} | ({"connect_args": {"connect_timeout": 10}} if url.startswith("postgres") else {})
    try:
        with quiet():
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=_retry())
    except sqlalchemy.exc.ArgumentError:
        raise GraftError(f"{where}: not a database URL (postgresql://USER@HOST:PORT/DB or sqlite:///FILE)") from None
    except ImportError:
        raise GraftError(f"{where}: the database's Python driver is not installed "
                         "(PostgreSQL: pip install psycopg psycopg-binary)") from None
    except sqlalchemy.exc.OperationalError as e:
        raise GraftError(f"{where}: cannot connect ({_reason(e)})") from None


def _reason(e) -> str:
    """psycopg's 'connection to server at ..., port 1 failed: Connection refused' -> 'connection refused'."""
    first = (str(getattr(e, "orig", None) or e).strip().splitlines() or ["unknown error"])[0]
    text = first.rsplit("failed: ", 1)[-1].removeprefix("FATAL:").strip()
    return text[:1].lower() + text[1:]


@contextlib.contextmanager
def quiet():
    """Heartbeats and the retry callback are marked experimental in Optuna; the warning is noise here."""
    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


def _retry():
    import optuna
    with quiet():
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Held while a worker counts the study and asks for a trial, so that workers sharing this
    folder (every journal worker, the local ones of a database) never start one trial too many,
    and never fail the same dead trial twice."""
    with open(Path(folder) / "workers.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim(trial) -> None:
    """Name this process as the trial's worker: if it dies, another worker on this host can tell."""
    trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid()})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie is dead: killed, not yet waited for by its parent
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def recover(study, storage) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and queue each again with the same parameters;
    returns their numbers. Call it under folder_lock."""
    import optuna
    from optuna.trial import TrialState
    if isinstance(storage, optuna.storages.RDBStorage):
        with quiet():
            optuna.storages.fail_stale_trials(study)  # any host: the heartbeat stopped
    lost, journal = [], isinstance(storage, optuna.storages.JournalStorage)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        # unclaimed: a journal's workers ask and claim under one lock, so its worker died in between
        # (or predates claims); in a database a worker elsewhere may be between the two
        if not worker and not journal:
            continue
        if worker and (worker.get("host") != HOST or worker.get("pid") == os.getpid() or alive(worker["pid"])):
            continue
        before = storage.get_trial(t._trial_id)  # the retry copies its attrs: not the error below
        try:
            storage.set_trial_user_attr(t._trial_id, "error", f"worker {HOST}:{worker.get('pid', '?')} died")
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # a worker elsewhere got there first
            continue
        _retry()(study, before)
        lost.append(t.number)
    return lost


def counted(trials) -> list:
    """Finished trials that count toward the total: a failed trial that was queued again is
    replaced by its retry, so it does not."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.state.is_finished() and t.number not in retried]


@contextlib.contextmanager
def heartbeat(storage, trial):
    """Beats for the trial while it runs (databases only: the journal has no heartbeat)."""
    import optuna
    if not isinstance(storage, optuna.storages.RDBStorage):
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            with contextlib.suppress(Exception):  # a missed beat is what the grace period is for
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="search-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def join_folder(url: str, out: str | Path = "runs", name: str | None = None, data: str | None = None,
                workers: int = 1) -> Path:
    """The folder OUT/NAME (default: the search's own name) from which this machine works on the
    search whose study is at `url`: base config, space and settings come from the study; `data`
    is where this machine keeps the same data, when not at the base config's path. Then
    `run_search(None, None, folder, resume=True)` works on it."""
    import optuna
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():  # else made empty
        raise GraftError(f"--join {url}: no such file; start a search there with graft search --storage URL")
    storage = open_storage(Path(out), url, "--join")
    if STUDY not in optuna.get_all_study_names(storage):
        raise GraftError(f"--join {shown(url)}: holds no search; start one with graft search --storage URL")
    attrs = optuna.load_study(study_name=STUDY, storage=storage).user_attrs
    if "settings" not in attrs:  # created a moment ago: its first worker is still writing them
        raise GraftError(f"--join {shown(url)}: the search is still being set up; join again in a moment")
    check_folder_name(name or attrs["name"], "--name" if name else "the search's stored name")
    folder = Path(out) / (name or attrs["name"])
    base = apply_overrides(copy.deepcopy(attrs["base"]), {"data.path": data})
    if folder.exists() and any(folder.iterdir()):
        same = ((folder / "base.yaml").is_file() and (folder / "space.yaml").is_file()
                and load_yaml(folder / "base.yaml") == base and load_yaml(folder / "space.yaml") == attrs["space"])
        if not same:
            raise GraftError(f"{folder}: holds another search; join into an empty folder with --name")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "base.yaml", f"# the base config every trial starts from (the study at {shown(url)})\n"
                      + yaml.safe_dump(base, sort_keys=False))
    resolve(folder / "base.yaml")  # --data that the base config cannot take is one line, here
    atomic_write_text(folder / "space.yaml", yaml.safe_dump(attrs["space"], sort_keys=False))
    known = {f.name for f in dataclasses.fields(SearchSettings)}
    saved = {k: v for k, v in attrs["settings"].items() if k in known}
    SearchSettings(**{**saved, "workers": workers, "storage": url}).save(folder)
    return folder
