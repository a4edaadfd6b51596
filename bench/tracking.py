"""What experiment tracking costs a run: `--log-to tensorboard`, `--log-to mlflow` (the embedded
SQLite store) and `--log-to mlflow --mlflow-uri` (a real MLflow server on loopback).

    python bench/tracking.py [--data ../shared/datasets/cifar10-jpeg.zip] [--epochs 10] [--repeats 3]

The run: `make demo`'s recipe (frozen EfficientNet-Lite0 at 128 px, multi-depth features) on
`--max-per-class` images per class, its features cached by a first, untimed run, so each timed run
is the head's training. Each logger joins the run wrapped in a clock that times its own events:
its start (settings), each epoch's `after_epoch`, and its end (test scores, plots, card, model
files): the time logging adds, whatever else the machine is doing, against the epoch's own
training time (metrics.jsonl's `seconds`) in the same run. Writes bench/results/tracking.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from record import commit, machine  # noqa: E402
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet.config import TrackConfig, resolve  # noqa: E402
from graftnet.train.loop import Callback  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402
from graftnet.train.tracking import trackers  # noqa: E402


class Clocked(Callback):
    """A logger whose run-level and epoch events are timed; everything else passes through."""

    def __init__(self, inner: Callback):
        self.inner, self.times = inner, {"before_run": 0.0, "after_epoch": [], "after_run": 0.0}

    @property
    def key(self) -> str:
        return self.inner.key

    def before_run(self, job, resume: bool) -> None:
        t0 = time.perf_counter()
        self.inner.before_run(job, resume)
        self.times["before_run"] = time.perf_counter() - t0

    def after_epoch(self, state, row) -> None:
        t0 = time.perf_counter()
        self.inner.after_epoch(state, row)
        self.times["after_epoch"].append(time.perf_counter() - t0)

    def after_run(self, job, metrics) -> None:
        t0 = time.perf_counter()
        self.inner.after_run(job, metrics)
        self.times["after_run"] = time.perf_counter() - t0


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "server-artifacts"), "--workers", "1"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"))
    ap.add_argument("--max-per-class", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    base = {"data.path": args.data, "data.max_per_class": args.max_per_class, "train.epochs": args.epochs,
            "out": str(work / "runs"), "cache_dir": str(work / "cache")}
    recipe = ROOT / "recipes" / "paper-cifar10.yaml"
    t0 = time.perf_counter()
    train(resolve(recipe, {**base, "name": "warm"}))  # the backbone pass, cached for every timed run
    warm_s = time.perf_counter() - t0
    proc, url = start_server(work)
    variants = {"tensorboard": TrackConfig(log_to="tensorboard"),
                "mlflow (SQLite store)": TrackConfig(log_to="mlflow"),
                "mlflow (server on loopback)": TrackConfig(log_to="mlflow", mlflow_uri=url)}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    load_before = os.getloadavg()[0]
    try:
        for rep in range(args.repeats):
            for name, track in variants.items():
                (logger,) = trackers(track)
                clock = Clocked(logger)
                run = train(resolve(recipe, {**base, "name": f"{name.split()[0]}-{rep}"}), callbacks=[clock])
                epoch_s = statistics.mean(r["seconds"] for r in run.history)
                t = clock.times
                results[name].append({"start_s": round(t["before_run"], 4),
                                      "per_epoch_s": round(statistics.mean(t["after_epoch"]), 5),
                                      "end_s": round(t["after_run"], 4), "train_epoch_s": round(epoch_s, 4)})
                print(f"{name:28s} start {t['before_run']:.3f} s  per epoch {statistics.mean(t['after_epoch']):.4f} s"
                      f"  end {t['after_run']:.3f} s  (an epoch's training {epoch_s:.3f} s)", flush=True)
    finally:
        proc.terminate()
    summary = {}
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        summary[name] = {**{k: round(v, 5) for k, v in med.items()},
                         "per_epoch_vs_training": round(med["per_epoch_s"] / med["train_epoch_s"], 4),
                         "whole_run_s": round(med["start_s"] + args.epochs * med["per_epoch_s"] + med["end_s"], 3)}
    out = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(), "commit": commit(),
           "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(os.getloadavg()[0], 2),
           "setup": {"recipe": "recipes/paper-cifar10.yaml", "max_per_class": args.max_per_class,
                     "epochs": args.epochs, "repeats": args.repeats, "warm_run_s": round(warm_s, 1)},
           "summary (medians over repeats)": summary, "runs": results}
    dest = ROOT / "bench" / "results" / "tracking.json"
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(dest)
    print(dest)


if __name__ == "__main__":
    main()
