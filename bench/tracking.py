"""What experiment tracking costs a run: `--log-to tensorboard`, `--log-to mlflow` (the embedded
SQLite store) and `--log-to mlflow --mlflow-uri` (a real MLflow server on loopback), against the
same run with no logger, in one process.

    python bench/tracking.py [--data ../shared/datasets/cifar10-jpeg.zip] [--epochs 10] [--repeats 2]

The run: `make demo`'s recipe (frozen EfficientNet-Lite0 at 128 px, multi-depth features) on
`--max-per-class` images per class, its features cached by a first, untimed run, so every timed run
is the head's training plus what the logger adds. Per epoch: the mean time from one epoch's end to
the next (the logger's `after_epoch` included); fixed: the run's wall time less its epochs (start,
test scoring, plots, and the logger's start and end: parameters, artifacts, the model). Variants
are timed in turns, `--repeats` times. Writes bench/results/tracking.json.
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
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from graftnet.config import resolve  # noqa: E402
from graftnet.train.loop import Callback  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402


class EpochClock(Callback):
    """Epoch ends on the clock. Joins the run last, so each interval holds the loggers' after_epoch."""
    key = "EpochClock"

    def __init__(self):
        self.ends: list[float] = []

    def after_epoch(self, state, row) -> None:
        self.ends.append(time.perf_counter())


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
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    base = {"data.path": args.data, "data.max_per_class": args.max_per_class, "train.epochs": args.epochs,
            "out": str(work / "runs"), "cache_dir": str(work / "cache")}
    recipe = ROOT / "recipes" / "paper-cifar10.yaml"
    t0 = time.perf_counter()
    train(resolve(recipe, {**base, "name": "warm"}))  # the backbone pass, cached for every timed run
    warm_s = time.perf_counter() - t0
    proc, url = start_server(work)
    variants = {"none": {}, "tensorboard": {"track.log_to": "tensorboard"},
                "mlflow (SQLite store)": {"track.log_to": "mlflow"},
                "mlflow (server on loopback)": {"track.log_to": "mlflow", "track.mlflow_uri": url}}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    load_before = os.getloadavg()[0]
    try:
        for rep in range(args.repeats):
            for name, extra in variants.items():
                clock = EpochClock()
                t0 = time.perf_counter()
                run = train(resolve(recipe, {**base, **extra, "name": f"{name.split()[0]}-{rep}"}), callbacks=[clock])
                wall = time.perf_counter() - t0
                gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
                results[name].append({"wall_s": round(wall, 3), "epoch_s": round(statistics.mean(gaps), 4),
                                      "fixed_s": round(wall - sum(gaps) - statistics.mean(gaps), 3),
                                      "test_accuracy": run.metrics["accuracy"]})
                print(f"{name:28s} wall {wall:6.2f} s  per epoch {statistics.mean(gaps):.4f} s", flush=True)
    finally:
        proc.terminate()
    summary = {}
    for name, runs in results.items():
        summary[name] = {"epoch_s": round(statistics.mean(r["epoch_s"] for r in runs), 4),
                         "fixed_s": round(statistics.mean(r["fixed_s"] for r in runs), 3),
                         "wall_s": round(statistics.mean(r["wall_s"] for r in runs), 3)}
    none = summary["none"]
    for name, s in summary.items():
        s["epoch_overhead_s"] = round(s["epoch_s"] - none["epoch_s"], 4)
        s["fixed_overhead_s"] = round(s["fixed_s"] - none["fixed_s"], 3)
        s["wall_vs_none"] = round(s["wall_s"] / none["wall_s"], 3)
    out = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{_cpu()}, {os.cpu_count()} cores", "commit": _commit(),
           "load_average_1min_before": round(load_before, 2), "load_average_1min_after": round(os.getloadavg()[0], 2),
           "setup": {"recipe": "recipes/paper-cifar10.yaml", "max_per_class": args.max_per_class,
                     "epochs": args.epochs, "repeats": args.repeats, "warm_run_s": round(warm_s, 1)},
           "summary": summary, "runs": results}
    dest = ROOT / "bench" / "results" / "tracking.json"
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(dest)
    for name, s in summary.items():
        print(f"{name:28s} +{s['epoch_overhead_s']:.4f} s/epoch  +{s['fixed_overhead_s']:.2f} s/run  "
              f"x{s['wall_vs_none']:.3f} wall")
    print(dest)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown cpu"


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
