"""Load test for `graft serve`: start the server in a subprocess, fire requests, check it holds up.

    python bench/serve_load.py RUN [--requests 3000] [--concurrency 8] [--max-rss-growth-mb 32] [--max-batch 16]

Starts `python -m graftnet.cli serve RUN` on a free loopback port, waits for /health, then sends
--requests POST /predict requests from --concurrency httpx clients (alternately multipart and raw
body), with images taken from the run's own data (its test split). It checks that every request got
a 200 with a class from the run's class list, and that the server's resident memory (VmRSS in
/proc/PID/status) grew by at most --max-rss-growth-mb between the end of the first block of
requests (a third of them, at most 1000) and the end of the last. Prints requests/s and latency
percentiles, the ratio against a baseline measured first in the same run (--baseline
N in-process predictions: decode + model, one at a time, no HTTP) and, last, one JSON line with everything; exit status 1 when a check fails.
The client runs on the same machine as the server: on a small CPU it takes part of the cores.

    python bench/serve_load.py RUN --hostile 8 [--seconds 20] [--repeats 2] [--tree DIR] [--before DIR]
        [--out bench/results/serve_load.json]

Hostile mode: does the server hold under uploads that decode to huge images? Phases of --seconds
each, alternating, --repeats times: normal load alone (--concurrency clients, the run's test
images), then the same normal load beside --hostile clients that each upload a 170 KB PNG of
6300 x 6300 RGBA pixels (160 MB decoded) again and again, as soon as the last one was answered
(a hostile client ignores Retry-After). Per phase: requests/s, latency p50/p95/p99, the server's
peak RSS (VmHWM, reset before the phase) and its RSS 2 s after, answers by status; and the ratios
of the hostile phase to the normal one before it. --tree runs the server from another checkout
(e.g. an older commit), --before runs one pair against another tree first, for a before/after
in one record. The record (command, machine, date, git state, numbers)
goes to --out, written to a temporary file and renamed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import collections
import io

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's graftnet, not an installed one
sys.path.insert(0, str(ROOT / "bench"))
from equivalence import atomic_write_json, git_state, loadavg, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def sample_images(run: Path, n: int) -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) of up to n images from the test split of the run's data."""
    from graftnet.config import resolve
    from graftnet.data.images import config_splits
    from graftnet.data.sources import open_source
    cfg = resolve(run / "config.yaml")
    source = open_source(cfg.data.path, cfg.cache_dir)
    out = []
    for key, _ in config_splits(source, cfg.data)["test"][:n]:
        name = Path(source.describe(key)).name
        out.append((name, source.read(key), mimetypes.guess_type(name)[0] or "image/jpeg"))
    return out


def in_process_rate(run: Path, images, n: int, threads: int | None) -> float:
    """Baseline: images/s of decode + model in this process, one at a time, no HTTP."""
    from graftnet import serve
    from graftnet.data.images import square_uint8
    from graftnet.predictor import load_predictor
    serve.set_threads(threads or serve.default_threads())  # as the server sets them
    predictor = load_predictor(run)
    call = lambda data: predictor([square_uint8(serve.open_image(data), predictor.image_size)])  # noqa: E731
    call(images[0][1])
    t0 = time.perf_counter()
    for i in range(n):
        call(images[i % len(images)][1])
    return n / (time.perf_counter() - t0)


async def post(client, url: str, image: tuple[str, bytes, str], i: int):
    """POST one image: odd requests as multipart (field `file`), even ones as the raw body."""
    name, data, ctype = image
    if i % 2:
        return await client.post(url, files={"file": (name, data, ctype)})
    return await client.post(url, content=data, headers={"content-type": ctype})


def start_server(run: Path, port: int, threads: int | None, max_batch: int = 16,
                 tree: Path = ROOT, log=None) -> subprocess.Popen:
    """`graft serve` from `tree`'s graftnet (run from there: -m puts the working folder first on
    the path); its stderr to `log` (an open file), else a pipe read only if it fails to start."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "graftnet.cli", "serve", str(Path(run).resolve()), "--port", str(port),
           "--max-batch", str(max_batch)]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=log or subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log is None and proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not answer /health within 120 s")


async def fire(url: str, images, n: int, concurrency: int, classes: set[str], on_done) -> tuple[list, list]:
    latencies, errors = [], []
    counter = iter(range(n))

    async def worker(client: httpx.AsyncClient):
        for i in counter:  # shared iterator: each request index goes to exactly one worker
            t0 = time.perf_counter()
            try:
                r = await post(client, url, images[i % len(images)], i)
                ok = r.status_code == 200 and r.json().get("class") in classes
                if not ok:
                    errors.append(f"request {i}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"request {i}: {type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t0)
            on_done(len(latencies))

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, errors


def run(run_dir: Path, requests: int, concurrency: int, max_growth_mb: float, threads: int | None,
        baseline: int, max_batch: int = 16) -> dict:
    images = sample_images(run_dir, 64)
    base_rate = in_process_rate(run_dir, images, baseline, threads) if baseline else None
    port = free_port()
    proc = start_server(run_dir, port, threads, max_batch)
    try:
        base = f"http://127.0.0.1:{port}"
        info = httpx.get(f"{base}/info").json()
        block = min(1000, max(1, requests // 3))
        rss = {"start": rss_mb(proc.pid)}

        def on_done(done: int):
            if done == block:
                rss["first_block"] = rss_mb(proc.pid)
        t0 = time.perf_counter()
        latencies, errors = asyncio.run(fire(f"{base}/predict", images, requests, concurrency,
                                             set(info["classes"]), on_done))
        wall = time.perf_counter() - t0
        rss["end"] = rss_mb(proc.pid)
        batches = httpx.get(f"{base}/info").json().get("batches_by_size")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    q = statistics.quantiles(latencies, n=100)
    growth = rss["end"] - rss["first_block"]
    return {"run": str(run_dir), "backbone": info["backbone"], "image_size": info["image_size"],
            "requests": requests, "concurrency": concurrency, "max_batch": max_batch,
            "batches_by_size": batches, "errors": len(errors),
            "first_errors": errors[:5], "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 1),
            "latency_ms": {"p50": round(q[49] * 1000, 1), "p90": round(q[89] * 1000, 1),
                           "p99": round(q[98] * 1000, 1), "max": round(max(latencies) * 1000, 1)},
            "in_process_per_s": base_rate and round(base_rate, 1),
            "server_vs_in_process": base_rate and round(requests / wall / base_rate, 2),
            "rss_mb": {k: round(v, 1) for k, v in rss.items()}, "rss_growth_mb": round(growth, 1),
            "rss_block": block, "max_rss_growth_mb": max_growth_mb,
            "ok": not errors and growth <= max_growth_mb,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d")}


# ---------------------------------------------------------------------------------------------------
# hostile mode


def huge_png() -> bytes:
    """6300 x 6300 RGBA, one colour, half transparent: ~170 KB that decode to 160 MB (39.7 M pixels,
    under the server's 40 M pixel limit)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGBA", (6300, 6300), (30, 120, 200, 128)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def memory_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for process {pid}")


async def phase(url: str, images, seconds: float, concurrency: int, classes: set[str],
                hostile: int, huge: bytes) -> dict:
    """Normal load for `seconds` from `concurrency` clients, beside `hostile` clients uploading
    `huge` back to back; latencies and statuses of both."""
    normal, bad, hostile_status, finished = [], collections.Counter(), collections.Counter(), []
    start = time.perf_counter()
    end = start + seconds

    async def worker(client: httpx.AsyncClient, i: int):
        while time.perf_counter() < end:
            image = images[i % len(images)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                r = await post(client, url, image, i)
                status = r.status_code if r.status_code != 200 or r.json().get("class") in classes else "wrong"
            except httpx.HTTPError as e:
                status = type(e).__name__
            normal.append((time.perf_counter() - t0, status))
            if status != 200:
                bad[status] += 1
        finished.append(time.perf_counter())

    async def attacker(client: httpx.AsyncClient):
        while time.perf_counter() < end:
            try:
                r = await client.post(url, content=huge, headers={"content-type": "image/png"})
                hostile_status[r.status_code] += 1
            except httpx.HTTPError as e:
                hostile_status[type(e).__name__] += 1

    async with httpx.AsyncClient(timeout=120) as client, httpx.AsyncClient(timeout=120) as rough:
        await asyncio.gather(*(worker(client, i) for i in range(concurrency)),
                             *(attacker(rough) for _ in range(hostile)))
    wall = max(finished) - start  # the normal clients' time (an attacker's last upload may end later)
    lat = [t for t, _ in normal]
    q = statistics.quantiles(lat, n=100)
    statuses = collections.Counter(str(s) for _, s in normal)
    return {"hostile_clients": hostile, "seconds": round(wall, 2), "requests": len(normal),
            "requests_per_s": round(statuses.get("200", 0) / wall, 2),
            "latency_ms": {"p50": round(q[49] * 1000, 1), "p95": round(q[94] * 1000, 1),
                           "p99": round(q[98] * 1000, 1), "max": round(max(lat) * 1000, 1)},
            "normal_by_status": dict(statuses), "hostile_by_status": {str(k): v for k, v in hostile_status.items()}}


def hostile_run(args) -> dict:
    where = machine()  # its load average now, before the phases
    images = sample_images(args.run, 64)
    huge = huge_png()
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
    with log_path.open("w") as log:
        proc = start_server(args.run, port, args.threads, args.max_batch, args.tree, log)
        try:
            base = f"http://127.0.0.1:{port}"
            info = httpx.get(f"{base}/info").json()
            classes = set(info["classes"])
            asyncio.run(phase(f"{base}/predict", images, 3, args.concurrency, classes, 0, huge))  # warm-up
            rss_start, phases = memory_mb(proc.pid, "VmRSS"), []
            for r in range(args.repeats):
                for hostile in (0, args.hostile):
                    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
                    rss_before = memory_mb(proc.pid, "VmRSS")
                    p = asyncio.run(phase(f"{base}/predict", images, args.seconds, args.concurrency, classes,
                                          hostile, huge))
                    peak = memory_mb(proc.pid, "VmHWM")
                    time.sleep(2)
                    p.update(repeat=r, rss_mb={"before": round(rss_before, 1), "peak": round(peak, 1),
                                               "after_2s": round(memory_mb(proc.pid, "VmRSS"), 1)})
                    phases.append(p)
                    print(f"repeat {r}, {hostile} hostile: {p['requests_per_s']} req/s, latency {p['latency_ms']}, "
                          f"RSS {p['rss_mb']}, normal {p['normal_by_status']}, hostile {p['hostile_by_status']}",
                          file=sys.stderr)
            limits = httpx.get(f"{base}/info").json().get("limits")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    stderr = log_path.read_text()
    shutil.rmtree(log_path.parent, ignore_errors=True)
    ratios = []
    for alone, beside in zip(phases[::2], phases[1::2]):
        ratios.append({"requests_per_s": round(beside["requests_per_s"] / alone["requests_per_s"], 3),
                       **{k: round(beside["latency_ms"][k] / alone["latency_ms"][k], 3) for k in ("p50", "p95", "p99")},
                       "peak_rss_over_start_mb": round(beside["rss_mb"]["peak"] - rss_start, 1)})
    return {"command": " ".join(["python", "bench/serve_load.py"] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": where, "git": git_state(ROOT),
            "server_tree": "this checkout" if args.tree == ROOT else
                           git_state(args.tree) if (args.tree / ".git").exists() else str(args.tree),
            "run": str(args.run), "backbone": info["backbone"], "image_size": info["image_size"],
            "server_limits": limits, "concurrency": args.concurrency, "hostile_clients": args.hostile,
            "hostile_upload": {"bytes": len(huge), "pixels": 6300 * 6300, "mode": "RGBA"},
            "rss_mb_start": round(rss_start, 1), "phases": phases, "ratios_hostile_over_alone": ratios,
            "server_tracebacks": stderr.count("Traceback"), "loadavg_end": loadavg()}


def print_table(r: dict) -> None:
    print("| phase | requests/s | p50 / p95 / p99 ms | peak RSS MB (start %.0f) | normal answers | hostile answers |"
          % r["rss_mb_start"])
    print("|---|---:|---|---:|---|---|")
    for p in r["phases"]:
        lat = p["latency_ms"]
        print(f"| {'beside %d hostile' % p['hostile_clients'] if p['hostile_clients'] else 'normal alone'} "
              f"(repeat {p['repeat']}) | {p['requests_per_s']} | {lat['p50']} / {lat['p95']} / {lat['p99']} | "
              f"{p['rss_mb']['peak']:.0f} | {p['normal_by_status']} | {p['hostile_by_status'] or '-'} |")
    for i, q in enumerate(r["ratios_hostile_over_alone"]):
        print(f"repeat {i}: hostile / alone: {q}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-rss-growth-mb", type=float, default=32.0)
    p.add_argument("--threads", type=int, help="the server's torch threads (default: its own choice)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: one at a time)")
    p.add_argument("--baseline", type=int, default=200,
                   help="first time N in-process predictions (decode + model, no HTTP); 0: skip")
    p.add_argument("--hostile", type=int, default=0,
                   help="hostile mode: normal load alone, then beside N clients uploading huge PNGs")
    p.add_argument("--seconds", type=float, default=20.0, help="hostile mode: length of each phase")
    p.add_argument("--repeats", type=int, default=2, help="hostile mode: alone/hostile pairs of phases")
    p.add_argument("--tree", type=Path, default=ROOT, help="hostile mode: graftnet checkout the server runs from")
    p.add_argument("--before", type=Path,
                   help="hostile mode: first run one pair of phases against the server of this graftnet "
                        "tree (e.g. the code before a change), recorded under `before`")
    p.add_argument("--out", type=Path, help="hostile mode: write the record here (JSON)")
    args = p.parse_args()
    if args.hostile:
        before = None
        if args.before:
            before = hostile_run(argparse.Namespace(**{**vars(args), "tree": args.before.resolve(), "repeats": 1}))
            print_table(before)
        args.tree = args.tree.resolve()
        r = hostile_run(args)
        print_table(r)
        if before:
            r["before"] = {k: before[k] for k in ("server_tree", "server_limits", "rss_mb_start", "phases",
                                                  "ratios_hostile_over_alone", "server_tracebacks", "loadavg_end")}
        if args.out:
            atomic_write_json(args.out, r)
        return 0
    r = run(args.run, args.requests, args.concurrency, args.max_rss_growth_mb, args.threads, args.baseline,
            args.max_batch)
    lat = r["latency_ms"]
    print(f"{r['requests']} requests, concurrency {r['concurrency']}: {r['requests_per_s']} req/s, "
          f"latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms; "
          f"(in-process baseline {r['in_process_per_s']} img/s, ratio {r['server_vs_in_process']}); "
          f"errors {r['errors']}; server RSS {r['rss_mb']} MB (growth after the first {r['rss_block']} "
          f"requests: {r['rss_growth_mb']} MB, bound {r['max_rss_growth_mb']} MB)", file=sys.stderr)
    for e in r["first_errors"]:
        print("  " + e, file=sys.stderr)
    print(json.dumps(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
