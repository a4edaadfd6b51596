"""Decoded images in memory against read per batch from disk: peak memory, speed, a hard limit.

    python bench/streaming.py [--stages data,decode,memory,speed,limit] [--sizes 10000,25000,50000]
                              [--redo STAGE,...] [--steps 10] [--work DIR]

Data: CIFAR-10 (the shared JPEG copy) written again as 256 x 256 JPEGs (bicubic, quality 90), so
that at 224 px each decoded image is 150 KB, as a photo or scan would be (CIFAR's own 32 px images
are 3 KB and would hide the question). Stages, each resumable (results kept in
bench/results/streaming.json, written after every measurement):

- data: the 60,000 JPEGs, once, under bench/.work/streaming.
- decode: images per second of the first decoding pass in threads and in worker processes
  (data/decoding.py), for the 256 px JPEGs at 224 px and CIFAR's 32 px JPEGs: sets data.decode_in's default.
- memory: for each training-set size (max_per_class = size / 10), `graft train` at 224 px on the
  frozen backbone (features cached in a first run), then the first fine-tuning steps, each with
  `data.in_memory` yes (the path before records: every decoded image in memory) and no (records
  read per batch); the peak resident memory of the command's whole process tree (sampled every
  0.2 s), wall time, and fine-tuning images per second.
- limit: the largest size's frozen run inside a memory cgroup limited to 4 GiB, in each mode and in
  auto (which reads the limit): does it finish?
- speed: fine-tuning batches at 224 px from memory and from records, alternating in one process.
- epoch: a whole fine-tuning epoch of the smallest size from records (peak over the epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from record import commit, machine  # noqa: E402

WORK = ROOT / "bench" / ".work" / "streaming"
RESULTS = ROOT / "bench" / "results" / "streaming.json"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.zip"
PY = sys.executable


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(results: dict) -> None:
    results.update(command="python bench/streaming.py " + " ".join(sys.argv[1:]), machine=machine(),
                   date=datetime.now().isoformat(timespec="seconds"), commit=commit())
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(RESULTS)


def _convert(args):
    from PIL import Image
    names, out = args
    with zipfile.ZipFile(CIFAR) as zf:
        for name in names:
            parts = name.split("/")  # cifar10/<split>/<class>/<file>
            dest = out / parts[1] / parts[2] / (Path(parts[3]).stem + ".jpg")
            if dest.is_file():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as f:
                img = Image.open(f).convert("RGB").resize((256, 256), Image.BICUBIC)
            img.save(dest, quality=90)


def make_data() -> Path:
    out = WORK / "cifar256"
    if (out / ".complete").is_file():
        return out
    from multiprocessing import Pool
    with zipfile.ZipFile(CIFAR) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and n.count("/") == 3]
    chunks = [(names[i:i + 2000], out) for i in range(0, len(names), 2000)]
    t0 = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        for i, _ in enumerate(pool.imap_unordered(_convert, chunks)):
            print(f"data: {i + 1}/{len(chunks)} chunks", flush=True)
    (out / ".complete").write_text(f"{len(names)} images in {time.perf_counter() - t0:.0f} s\n")
    return out


def decode_stage(results: dict, data: Path) -> None:
    from graftnet.data.images import load_images, make_splits
    from graftnet.data.sources import open_source
    rows = results.setdefault("decode", {})
    for name, location, size in (("256px JPEG at 224", str(data), 224), ("CIFAR 32px JPEG (ZIP)", str(CIFAR), 128)):
        source = open_source(location)
        samples = make_splits(source, 0.1, 0.2, 0, max_per_class=800)["train"]
        for how in ("threads", "processes"):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                images = load_images(source, samples, size, workers=2, records=Path(tmp) / "r.records",
                                     processes=how == "processes")
                seconds = time.perf_counter() - t0
            rows.setdefault(name, {})[how] = {"images": len(images), "seconds": round(seconds, 2),
                                              "images_per_s": round(len(images) / seconds, 1)}
            print(f"decode {name} {how}: {len(images) / seconds:.0f} images/s", flush=True)
            save(results)


def _tree_rss(pid: int) -> int:
    """Resident bytes of pid and every process below it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measured(cmd: list[str], cgroup: Path | None = None, timeout: int = 3600) -> dict:
    """Run cmd; its wall time, exit status, and the peak resident memory of its process tree."""
    def enter():  # join the memory cgroup before exec, so the limit covers the whole command
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=enter)
    peak = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)
    threading.Thread(target=poll, daemon=True).start()
    out, _ = proc.communicate(timeout=timeout)
    done.set()
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(peak[0] / 2 ** 30, 3), "tail": out.strip().splitlines()[-3:]}


FT_CHILD = """
import json, os, sys, time
from graftnet import config
from graftnet.train.loop import Callback
from graftnet.train.pipeline import train
overrides, steps, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
class Steps(Callback):
    times = []
    def after_step(self, state):
        if state.stage != "fine-tuning":
            return
        self.times.append(time.perf_counter())
        if len(self.times) == steps + 2:  # two to warm up, then `steps` timed
            t = self.times[2:]
            bs = overrides["train.batch_size"]
            json.dump({"images_per_s": round(bs * (len(t) - 1) / (t[-1] - t[0]), 2), "steps": len(t) - 1,
                       "batch_size": bs}, open(out, "w"))
            sys.stdout.flush()
            os._exit(0)
train(config.resolve(None, overrides), callbacks=[Steps()])
"""


def _overrides(data: Path, size: int, mode: str, name: str) -> dict:
    return {"data.path": str(data), "data.max_per_class": size // 10, "backbone.image_size": 224,
            "data.in_memory": mode, "name": name, "out": str(WORK / "runs"), "cache_dir": str(WORK / "cache")}


def _frozen_cmd(data: Path, size: int, mode: str, name: str) -> list[str]:
    o = _overrides(data, size, mode, name)
    return [PY, "-m", "graftnet.cli", "train", "--data", o["data.path"], "--max-per-class", str(o["data.max_per_class"]),
            "--image-size", "224", "--name", name, "--out", o["out"], "--set", f"data.in_memory={mode}",
            "--cache-dir", o["cache_dir"]]


def memory_stage(results: dict, data: Path, sizes: list[int], steps: int, redo: bool) -> None:
    rows = results.setdefault("memory", {})
    for size in sizes:
        row = rows.setdefault(str(size), {})
        if "warm" not in row or redo:  # decodes into records and fills the feature cache
            row["warm"] = measured(_frozen_cmd(data, size, "no", f"warm-{size}-{time.time_ns()}"))
            print(f"{size}: first run (decode + features) {row['warm']}", flush=True)
            save(results)
        for mode in ("yes", "no"):
            key = f"frozen_{mode}"
            if key not in row or redo:
                row[key] = measured(_frozen_cmd(data, size, mode, f"frozen-{size}-{mode}-{time.time_ns()}"))
                print(f"{size} frozen in_memory={mode}: {row[key]}", flush=True)
                save(results)
        for mode in ("yes", "no"):
            key = f"finetune_{mode}"
            if key not in row or redo:
                out = WORK / f"ft-{size}-{mode}.json"
                o = {**_overrides(data, size, mode, f"ft-{size}-{mode}-{time.time_ns()}"), "train.epochs": 1,
                     "finetune.epochs": 1, "train.batch_size": 64}
                r = measured([PY, "-c", FT_CHILD, json.dumps(o), str(steps), str(out)])
                r.update(json.loads(out.read_text()) if out.is_file() else {"error": "no steps recorded"})
                row[key] = r
                print(f"{size} fine-tuning in_memory={mode}: {r}", flush=True)
                save(results)


def speed_stage(results: dict, data: Path, size: int, batches: int) -> None:
    """Fine-tuning steps at 224 px fed from memory and from records, alternating batch by batch in
    one process (background load hits both alike): data path alone, and data path + step."""
    import torch
    from graftnet import config
    from graftnet.data.augment import make_augment
    from graftnet.data.decoded import decode_split, placed
    from graftnet.data.images import config_splits
    from graftnet.data.sources import open_source
    from graftnet.features import image_batches
    from graftnet.model import build_model
    cfg = config.resolve(None, {k: v for k, v in _overrides(data, size, "no", "speed").items() if k != "name"})
    source = open_source(cfg.data.path)
    disk = decode_split(source, config_splits(source, cfg.data)["train"], 224, cfg.data, cfg.cache_dir)
    memory = placed(disk.subset(range(len(disk))), "yes")  # the same records, read into memory
    model, spec = build_model(cfg, source.classes)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] or list(model.parameters()), lr=1e-3)
    for p in model.parameters():
        p.requires_grad_(True)
    order = torch.randperm(len(disk), generator=torch.Generator().manual_seed(0)).tolist()
    bs = 64
    timing = {"memory": {"data": 0.0, "step": 0.0}, "disk": {"data": 0.0, "step": 0.0}}
    for b in range(batches + 1):
        idx = order[b * bs:(b + 1) * bs]
        for name, images in (("memory", memory), ("disk", disk)):
            aug = make_augment("flip", seed=b)
            t0 = time.perf_counter()
            x, y = next(image_batches(images, idx, bs, 224, spec.mean, spec.std, False, augment=aug, prefetch=0))
            t1 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            t2 = time.perf_counter()
            if b:  # the first batch of each warms up
                timing[name]["data"] += t1 - t0
                timing[name]["step"] += t2 - t0
    n = batches * bs
    row = {"images": n, "batch_size": bs, "train_images": len(disk), "records_gb": round(disk.images.nbytes / 2 ** 30, 2)}
    for name, t in timing.items():
        row[name] = {"data_images_per_s": round(n / t["data"], 1), "step_images_per_s": round(n / t["step"], 2)}
    row["disk_vs_memory_step"] = round(row["disk"]["step_images_per_s"] / row["memory"]["step_images_per_s"], 3)
    row["disk_vs_memory_data"] = round(row["disk"]["data_images_per_s"] / row["memory"]["data_images_per_s"], 3)
    results["speed"] = row
    print(f"speed: {row}", flush=True)
    save(results)


def epoch_stage(results: dict, data: Path, size: int) -> None:
    """A whole fine-tuning epoch from records (the memory stage times its first steps): does the
    peak stay where the first steps put it?"""
    out = WORK / f"epoch-{size}.json"
    o = {**_overrides(data, size, "no", f"epoch-{size}-{time.time_ns()}"), "train.epochs": 1,
         "finetune.epochs": 1, "train.batch_size": 64}
    batches = -(-int(size * 0.9) // 64)
    r = measured([PY, "-c", FT_CHILD, json.dumps(o), str(batches - 2), str(out)])  # ends at the last step
    r.update(json.loads(out.read_text()) if out.is_file() else {"error": "no steps recorded"})
    results["epoch"] = {"size": size, "batches": batches, **r}
    print(f"epoch: {results['epoch']}", flush=True)
    save(results)


def limit_stage(results: dict, data: Path, size: int, limit_gb: float) -> None:
    here = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if "memory" in line.split(":")[1].split(","))
    group = Path("/sys/fs/cgroup/memory") / here.lstrip("/") / f"graftnet-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 2 ** 30)))
        rows = results.setdefault("limit", {"size": size, "limit_gb": limit_gb})
        for mode in ("yes", "no", "auto"):
            r = measured(_frozen_cmd(data, size, mode, f"limit-{size}-{mode}-{time.time_ns()}"), cgroup=group)
            r["finished"] = r["rc"] == 0
            rows[mode] = r
            print(f"limit {limit_gb} GiB, {size} images, in_memory={mode}: {r}", flush=True)
            save(results)
    finally:
        time.sleep(1)
        group.rmdir()


def main() -> None:
    global WORK
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="data,decode,memory,speed,limit")
    p.add_argument("--sizes", default="10000,25000,50000")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--limit-gb", type=float, default=4.0)
    p.add_argument("--redo", default="")
    p.add_argument("--work", default=str(WORK), help="folder for the data, runs and caches")
    a = p.parse_args()
    WORK = Path(a.work)
    stages, redo = a.stages.split(","), set(a.redo.split(","))
    sizes = [int(s) for s in a.sizes.split(",")]
    results = load()
    data = make_data()
    if "decode" in stages and ("decode" not in results or "decode" in redo):
        results.pop("decode", None)
        decode_stage(results, data)
    if "memory" in stages:
        memory_stage(results, data, sizes, a.steps, "memory" in redo)
    if "speed" in stages and ("speed" not in results or "speed" in redo):
        speed_stage(results, data, max(sizes), a.steps)
    if "epoch" in stages and ("epoch" not in results or "epoch" in redo):
        epoch_stage(results, data, min(sizes))
    if "limit" in stages and ("limit" not in results or "limit" in redo):
        results.pop("limit", None)
        limit_stage(results, data, max(sizes), a.limit_gb)


if __name__ == "__main__":
    main()
