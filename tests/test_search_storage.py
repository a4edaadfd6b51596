"""Workers sharing one study: local `--workers`, a killed worker's trial retried, `graft search`
processes on a real PostgreSQL server, and a database that cannot be reached."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from graftnet import config
from graftnet.cli import main

from .conftest import ROOT, tiny_overrides

SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "head.hidden": {"type": "layers", "low": 0, "high": 1, "choices": [16, 32]}}


@pytest.fixture
def flags(image_folder, tmp_path) -> list[str]:
    """A tiny base config and space as files: what a `graft search` process is given."""
    config.save_yaml(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"train.epochs": 2})),
                     tmp_path / "base.yaml")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return ["--config", str(tmp_path / "base.yaml"), "--space", str(tmp_path / "space.yaml")]


def graft(*args: str) -> subprocess.Popen:
    """`graft ...` in a process of its own; its output goes to a file (a pipe nobody reads yet
    would fill and stall it)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="graft-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "graftnet.cli", *args], cwd=ROOT, text=True,
                            env={**os.environ, "GRAFTNET_QUIET": "1"}, stdout=log, stderr=subprocess.STDOUT)
    proc.log = Path(log.name)
    return proc


def output(proc: subprocess.Popen) -> str:
    text = proc.log.read_text()
    proc.log.unlink(missing_ok=True)
    return text[-3000:]


def finished(proc: subprocess.Popen, timeout: float = 120) -> None:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, output(proc)
    output(proc)


def kill_mid_trial(proc: subprocess.Popen, trials: Path) -> None:
    """SIGKILL the worker once its first trial is running (its run folder exists)."""
    deadline = time.monotonic() + 60
    while not (trials / "trial-000").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, output(proc)
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    output(proc)


def rows(folder: Path) -> list[dict]:
    return json.loads((folder / "trials.json").read_text())


def run_folders(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders for p in (f / "trials").glob("trial-*"))


def test_local_workers_end_with_exactly_the_trials_asked(flags, tmp_path):
    assert main(["search", *flags, "--workers", "2", "--trials", "4", "--out", str(tmp_path / "runs"),
                 "--name", "s"]) == 0
    folder = tmp_path / "runs" / "s"
    done = rows(folder)
    assert [r["number"] for r in done] == [0, 1, 2, 3]
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in done)
    assert run_folders(folder) == [f"trial-{n:03d}" for n in range(4)]
    assert json.loads((folder / "search.json").read_text())["trials_done"] == 4


def test_a_killed_worker_s_trial_is_failed_and_retried_on_resume(flags, tmp_path):
    folder = tmp_path / "runs" / "s"
    kill_mid_trial(graft("search", *flags, "--trials", "2", "--out", str(tmp_path / "runs"), "--name", "s"),
                   folder / "trials")
    assert main(["search", "--resume", str(folder)]) == 0  # the study's total: 2
    first, retry, third = rows(folder)
    assert first["state"] == "FAIL" and "died" in first["error"]
    assert retry["params"] == first["params"] and retry["state"] in ("COMPLETE", "PRUNED")
    assert third["state"] in ("COMPLETE", "PRUNED")
    assert json.loads((folder / "search.json").read_text())["best_trial"] in (1, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own on loopback, in a temporary folder; yields a function that
    makes a fresh database and returns its URL."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed: pip install -e '.[test]'")
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); .ci/run installs it")
    root = Path(tempfile.mkdtemp(prefix="graftnet-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the server runs as an ordinary user
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or not shutil.which("runuser"):
            pytest.skip("running as root without a postgres or nobody user (or runuser) to run PostgreSQL as")
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    port, data = _free_port(), root / "data"

    def run(*cmd):
        done = subprocess.run([*as_user, *map(str, cmd)], capture_output=True, text=True)
        if done.returncode:
            log = (root / "log").read_text() if (root / "log").is_file() else ""
            pytest.skip(f"PostgreSQL could not start here: {cmd[0].name} said {(done.stderr or log).strip()[-300:]}")

    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "graft", "-E", "UTF8", "--no-sync")
    run(bindir / "pg_ctl", "-D", data, "-l", root / "log", "-w", "-o",
        f"-k {root} -h 127.0.0.1 -p {port} -c fsync=off -c synchronous_commit=off", "start")
    made = []

    def database() -> str:
        name = f"search{len(made)}"
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "graft", name)
        made.append(name)
        return f"postgresql://graft@127.0.0.1:{port}/{name}"
    try:
        yield database
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


_STORAGES: dict = {}


def _study(url: str):
    # one storage (one connection pool) per URL: a study loaded from the URL itself opens a new
    # engine each time, and the polling loops below would use up the server's connections
    import optuna
    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url) if url.startswith("postgres") else url
    return optuna.load_study(study_name="graft-search", storage=_STORAGES[url])


def test_two_machines_share_one_study_on_postgres(postgres, flags, tmp_path):
    import fcntl
    import optuna
    url, a, b = postgres(), tmp_path / "a", tmp_path / "b"   # a and b: two machines' folders
    assert main(["search", *flags, "--storage", url, "--trials", "0", "--out", str(a), "--name", "s"]) == 0
    with open(a / "s" / "workers.lock", "a") as lock:
        # the first machine waits at its lock until the second has a trial: both surely work
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = graft("search", "--resume", str(a / "s"), "--trials", "6")
        # the first machine sets the total just before it reaches the lock: once the study holds it,
        # the first is at the lock, so the second cannot run every trial before the first gets one
        deadline = time.monotonic() + 60
        while _study(url).user_attrs.get("trials") != 6:
            assert first.poll() is None and time.monotonic() < deadline, output(first)
            time.sleep(0.05)
        second = graft("search", "--join", url, "--out", str(b), "--trials", "6")
        while not any(t.user_attrs.get("worker", {}).get("pid") == second.pid for t in _study(url).trials):
            assert second.poll() is None and time.monotonic() < deadline, output(second)
            time.sleep(0.05)
    finished(first), finished(second)
    trials = _study(url).trials
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert {t.user_attrs["worker"]["pid"] for t in trials} == {first.pid, second.pid}
    # every trial ran once, on one machine or the other: no run lost, none run twice
    assert run_folders(a / "s", b / "s") == [f"trial-{n:03d}" for n in range(6)]
    assert (b / "s" / "base.yaml").is_file() and len(rows(b / "s")) == 6


def test_a_killed_worker_s_trial_is_retried_by_a_machine_that_joins(postgres, flags, tmp_path):
    url = postgres()
    kill_mid_trial(graft("search", *flags, "--storage", url, "--trials", "2", "--out", str(tmp_path / "a"),
                         "--name", "s"), tmp_path / "a" / "s" / "trials")
    assert main(["search", "--join", url, "--out", str(tmp_path / "b")]) == 0
    first, retry, third = _study(url).trials
    assert first.state.name == "FAIL" and "died" in first.user_attrs["error"]
    assert retry.params == first.params and retry.state.name in ("COMPLETE", "PRUNED")
    assert third.state.name in ("COMPLETE", "PRUNED")


@pytest.mark.parametrize("flag", ["--storage", "--join"])
def test_an_unreachable_database_is_one_line_and_creates_nothing(flags, tmp_path, capsys, flag):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed")
    url = f"postgresql://graft:secret@127.0.0.1:{_free_port()}/nowhere"  # nothing listens there
    args = [*flags, "--storage", url] if flag == "--storage" else ["--join", url]
    assert main(["search", *args, "--out", str(tmp_path / "runs"), "--name", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot connect (connection refused)" in err, err
    assert f"{flag} postgresql://graft:***@127.0.0.1" in err and "secret" not in err
    assert not (tmp_path / "runs").exists()


def test_resume_and_join_refuse_settings_they_would_ignore(tmp_path, capsys):
    assert main(["search", "--join", "sqlite:///x.db", "--sampler", "random"]) == 2
    assert "drop --sampler" in capsys.readouterr().err
    assert main(["search", "--resume", str(tmp_path), "--join", "sqlite:///x.db"]) == 2
    assert "give one" in capsys.readouterr().err
