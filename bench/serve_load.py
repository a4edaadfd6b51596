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
"""
from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's graftnet, not an installed one


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


def start_server(run: Path, port: int, threads: int | None, max_batch: int = 16) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "graftnet.cli", "serve", str(run), "--port", str(port),
           "--max-batch", str(max_batch)]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
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
            name, data, ctype = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                if i % 2:
                    r = await client.post(url, files={"file": (name, data, ctype)})
                else:
                    r = await client.post(url, content=data, headers={"content-type": ctype})
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
    args = p.parse_args()
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
