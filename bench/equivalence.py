"""Equivalence of two source trees of graftnet: do they train the same models, to the last bit?

    python bench/equivalence.py --base TREE_A --new TREE_B
        [--data ../shared/datasets/cifar10-jpeg.zip] [--out bench/results/equivalence.json]
        [--scenarios NAME ...] [--work DIR] [--keep]

Measures, for each scenario below, whether the `graft` command of TREE_B produces what the one of
TREE_A produces, and how long each takes. Every command runs in a subprocess of this Python with
PYTHONPATH=TREE, so that tree's graftnet is the one imported (checked: each command prints
graftnet.__file__ and the script stops if it is not under TREE). Each tree gets its own fresh run
folder and its own cache (--cache-dir and GRAFTNET_CACHE), GRAFTNET_QUIET=1, the same seeds.

Compared for every run folder a scenario makes:
  - every row of metrics.jsonl, every key but `seconds` (train_loss, train_acc, val_loss, val_acc,
    lr, stage, ...): same rows, same keys, same values;
  - every number and string in test_metrics.json (accuracy, loss, top-k, per class, confusion, ...),
    model.json, and where the command writes them prune.json, qat.json, distill.json; paths with
    the run folder, the tree's work folder or the tree in them are compared as placeholders;
  - the sha256 of model.safetensors, test_logits.safetensors, test_predictions.csv and, for
    quantization-aware training, export/model.int8.onnx (where its bytes differ, its graph and
    weights without the exporter's stack traces, which name the tree's files: same_onnx, and then
    not qat.json's size_bytes either); where a safetensors file's bytes differ,
    its content (metadata, every tensor; their key order in the file is not reproducible, see
    compare_tensors) and the largest difference of any tensor.
A scenario is "identical" when all of that matches exactly, else the largest absolute difference
is reported; above 1e-6 (or different keys, rows, strings or tensor shapes) it fails. The resolved
config.yaml is compared too but only reported: a new key with its default changes no result.

Scenarios (CIFAR-10 slices, EfficientNet-Lite0, the embedded default backbone, so no download):
  1-recipe         graft train --config recipes/paper-cifar10.yaml --max-per-class 100 --epochs 3
                   (frozen backbone, 128 px, cached features)
  2-frozen-options the same slice with --early-stopping 1 --schedule cosine --warmup-epochs 1
                   --label-smoothing 0.1 --flip-views
  3-finetune       graft finetune --max-per-class 30 --image-size 64 --epochs 1 --finetune-epochs 2
                   --ema 0.9 --early-stopping 2 --unfreeze top:2
  4-resume         the run of 3 again, killed (SIGKILL) once metrics.jsonl holds 2 rows (the first
                   fine-tuning epoch), then `graft finetune --resume`: its result must equal the
                   uninterrupted run of 3 within each tree (rows "4-resume within ..."), and the
                   other tree's resumed run
  5-distill        graft distill --teacher RUN_OF_1 --max-per-class 100 --image-size 64 --epochs 3
                   (student head on cached features; each tree distills from its own teacher)
  6-prune          graft prune RUN_OF_3 --amount 0.2 --finetune-epochs 1 --calibrate 100
                   (structured, Taylor importance, the defaults)
  7-qat            graft quantize RUN_OF_3 --qat-epochs 1 --calibration 64
  --scenarios picks some (the runs they start from are made too).

Writes the JSON (--out, default bench/results/equivalence.json; temp file, then rename): the
command, the machine (CPU model, its vector extensions, cores), the date, both trees' commits and
whether they had uncommitted changes, and per scenario the comparison and each tree's wall time
and CPU time (user + system of the commands: less swayed by other load than wall time, not immune).
Prints a markdown table. Exit code 1 when a scenario differs by more than 1e-6 (they are listed),
2 when a command fails (its log's end is printed; the work folder is kept).
Scenarios run one tree after the other, interleaved and alternating which goes first, so that a
slower spell of a shared machine falls on both; on a 2-core CPU the whole set takes 3-8 minutes per
tree, with the machine's other load. Running a tree against itself (--base X --new X) is the check
that the scenarios are deterministic, and shows the timing noise: on a shared 2-core machine single
scenarios came out 0.4-2x in such a self-comparison and the whole set 0.8-1.2x, so only a total
ratio well outside that says the new tree is slower or faster
(bench/results/equivalence_baseline_self.json).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
COMMAND_TIMEOUT_S = 3600
# Prints the graftnet that is imported, so each command proves which tree it ran.
LAUNCH = ("import sys, graftnet; print('graftnet-module:', graftnet.__file__, file=sys.stderr, flush=True); "
          "from graftnet.cli import main; sys.exit(main())")
# Timing keys of metrics rows: the one thing allowed to differ.
SKIP_ROW_KEYS = {"seconds"}


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------
# running one tree's graft


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Tree:
    """One source tree, with its own work folder (runs/, cache/, logs/) for this benchmark."""

    def __init__(self, label: str, path: Path, work: Path, data: Path):
        self.label, self.path, self.data = label, path, data
        self.work = work / label
        self.runs, self.cache, self.logs = self.work / "runs", self.work / "cache", self.work / "logs"
        for d in (self.runs, self.cache, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.n_commands = 0
        self.wall = self.cpu = 0.0  # totals over this tree's commands so far
        # Folders that differ between the trees by design, as placeholders in compared strings.
        self.places = [(str(self.work), "<work>"), (str(path), "<tree>")]
        self.env = {**os.environ, "PYTHONPATH": str(path), "GRAFTNET_QUIET": "1",
                    "GRAFTNET_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1"}
        # A stray GRAFTNET_CIFAR10 or distributed variable would change what a command reads or does.
        # PYTHONHASHSEED stays random, as for users: a result that hangs on set order should show.
        for key in ("GRAFTNET_CIFAR10", "WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONHASHSEED"):
            self.env.pop(key, None)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-c", LAUNCH, *args]

    def start(self, *args: str) -> tuple[subprocess.Popen, Path]:
        self.n_commands += 1
        self._t0, self._cpu0 = time.perf_counter(), children_cpu()
        log = self.logs / f"{self.n_commands:02d}-{args[0]}.log"
        with open(log, "w") as fh:
            fh.write("$ graft " + " ".join(args) + "\n")
            fh.flush()
            proc = subprocess.Popen(self.argv(*args), cwd=self.work, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def stop_clock(self) -> None:
        """After the command was reaped: add its wall time and CPU time (user + system of the command
        and the processes it waited for)."""
        self.wall += time.perf_counter() - self._t0
        self.cpu += children_cpu() - self._cpu0

    def check_module(self, log: Path) -> None:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("graftnet-module:")]
        if not lines:
            raise BenchError(f"{self.label}: no graftnet-module line in {log}")
        module = Path(lines[0].split(":", 1)[1].strip()).resolve()
        if not module.is_relative_to(self.path.resolve() / "graftnet"):
            raise BenchError(f"{self.label}: imported {module}, not the graftnet of {self.path}")

    def graft(self, *args: str) -> float:
        """Run `graft ARGS` to the end; its wall time. A failure stops the benchmark with its log."""
        t0 = time.perf_counter()
        proc, log = self.start(*args)
        try:
            rc = proc.wait(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BenchError(f"{self.label}: graft {' '.join(args)} ran over {COMMAND_TIMEOUT_S}s; log {log}")
        self.stop_clock()
        self.check_module(log)
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise BenchError(f"{self.label}: graft {' '.join(args)} exited {rc}; log {log}:\n{tail}")
        return time.perf_counter() - t0

    def graft_killed(self, run_dir: Path, rows: int, *args: str) -> tuple[float, dict]:
        """Run `graft ARGS` and SIGKILL it as soon as run_dir/metrics.jsonl holds `rows` rows
        (metrics.jsonl is rewritten right after each epoch's checkpoint, so that epoch is saved)."""
        t0 = time.perf_counter()
        proc, log = self.start(*args)
        metrics = run_dir / "metrics.jsonl"
        seen = 0
        while proc.poll() is None and time.perf_counter() - t0 < COMMAND_TIMEOUT_S:
            if metrics.is_file():
                seen = sum(1 for ln in metrics.read_text().splitlines() if ln.strip())
                if seen >= rows:
                    break
            time.sleep(0.05)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        self.stop_clock()
        seconds = time.perf_counter() - t0
        self.check_module(log)
        if not killed and rc != 0:
            raise BenchError(f"{self.label}: graft {' '.join(args)} exited {rc} before the kill; log {log}")
        return seconds, {"killed": killed, "rows_at_kill": seen}


# ---------------------------------------------------------------------------------------------------
# scenarios: each runs its commands in one tree and returns {artifact name: run folder} and notes;
# `done` holds the folders of the scenarios run before in the same tree.


def s_recipe(t: Tree, done: dict) -> tuple[dict, dict]:
    run = t.runs / "recipe"
    t.graft("train", "--config", str(t.path / "recipes" / "paper-cifar10.yaml"), "--data", str(t.data),
            "--max-per-class", "100", "--epochs", "3", "--seed", "0",
            "--out", str(t.runs), "--name", run.name, "--cache-dir", str(t.cache))
    return {"run": run}, {}


def s_frozen_options(t: Tree, done: dict) -> tuple[dict, dict]:
    run = t.runs / "frozen-options"
    t.graft("train", "--config", str(t.path / "recipes" / "paper-cifar10.yaml"), "--data", str(t.data),
            "--max-per-class", "100", "--epochs", "3", "--seed", "0",
            "--early-stopping", "1", "--schedule", "cosine", "--warmup-epochs", "1",
            "--label-smoothing", "0.1", "--flip-views",
            "--out", str(t.runs), "--name", run.name, "--cache-dir", str(t.cache))
    return {"run": run}, {}


def finetune_args(t: Tree, name: str) -> list[str]:
    return ["finetune", "--data", str(t.data), "--max-per-class", "30", "--image-size", "64",
            "--epochs", "1", "--finetune-epochs", "2", "--ema", "0.9", "--early-stopping", "2",
            "--unfreeze", "top:2", "--seed", "0",
            "--out", str(t.runs), "--name", name, "--cache-dir", str(t.cache)]


def s_finetune(t: Tree, done: dict) -> tuple[dict, dict]:
    run = t.runs / "finetune"
    t.graft(*finetune_args(t, run.name))
    return {"run": run}, {}


def s_resume(t: Tree, done: dict) -> tuple[dict, dict]:
    run = t.runs / "finetune-resumed"
    # 2 rows: the frozen epoch and the first fine-tuning epoch are done, the second is under way.
    s1, notes = t.graft_killed(run, 2, *finetune_args(t, run.name))
    if not notes["killed"]:
        raise BenchError(f"{t.label}: the run to kill finished first; the resume was not exercised")
    s2 = t.graft("finetune", "--resume", str(run))
    return {"run": run}, {**notes, "seconds_killed": round(s1, 2), "seconds_resume": round(s2, 2)}


def s_distill(t: Tree, done: dict) -> tuple[dict, dict]:
    run = t.runs / "distill"
    t.graft("distill", "--teacher", str(done["1-recipe"]["run"]), "--data", str(t.data),
            "--max-per-class", "100", "--image-size", "64", "--epochs", "3", "--seed", "0",
            "--out", str(t.runs), "--name", run.name, "--cache-dir", str(t.cache))
    return {"run": run}, {}


def s_prune(t: Tree, done: dict) -> tuple[dict, dict]:
    run = t.runs / "finetune-pruned"
    t.graft("prune", str(done["3-finetune"]["run"]), "--amount", "0.2", "--finetune-epochs", "1",
            "--calibrate", "100", "--seed", "0", "--out", str(t.runs), "--name", run.name)
    return {"run": run}, {}


def s_qat(t: Tree, done: dict) -> tuple[dict, dict]:
    src = done["3-finetune"]["run"]
    t.graft("quantize", str(src), "--qat-epochs", "1", "--calibration", "64")
    # qat_run names its run RUN-qat beside RUN.
    return {"run": src.parent / f"{src.name}-qat"}, {}


SCENARIOS = {  # name: (function, scenarios whose runs it starts from, description)
    "1-recipe": (s_recipe, [], "paper recipe, frozen, 100/class, 3 epochs (128 px, cached features)"),
    "2-frozen-options": (s_frozen_options, [], "1 + early stopping, cosine, warmup, label smoothing, flip views"),
    "3-finetune": (s_finetune, [], "finetune 30/class, 64 px, 1+2 epochs, EMA 0.9, early stopping 2, top:2"),
    "4-resume": (s_resume, ["3-finetune"], "3 killed after its first fine-tuning epoch, then --resume"),
    "5-distill": (s_distill, ["1-recipe"], "distill from 1's run, 100/class, 64 px, 3 epochs"),
    "6-prune": (s_prune, ["3-finetune"], "prune 3's run: structured 20%, 1 recovery epoch, calibrate 100"),
    "7-qat": (s_qat, ["3-finetune"], "quantization-aware training of 3's run, 1 epoch, int8 ONNX"),
}
# Within-tree checks: the run of the first scenario must equal the run of the second.
WITHIN = {"4-resume": "3-finetune"}


# ---------------------------------------------------------------------------------------------------
# comparing two run folders


def sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Diff:
    """Largest absolute difference of numbers, and the structural mismatches (which always fail)."""

    def __init__(self):
        self.max_abs, self.where, self.mismatches, self.unequal = 0.0, None, [], 0

    def number(self, where: str, a, b) -> None:
        if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            return
        self.unequal += 1
        d = abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf
        if d > self.max_abs or self.where is None:
            self.max_abs, self.where = d, where

    def walk(self, where: str, a, b) -> None:
        if is_number(a) and is_number(b):
            self.number(where, a, b)
        elif isinstance(a, dict) and isinstance(b, dict):
            if set(a) != set(b):
                self.mismatches.append(f"{where}: keys {sorted(set(a) ^ set(b))} in one only")
            for k in sorted(set(a) & set(b), key=str):
                self.walk(f"{where}.{k}", a[k], b[k])
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                self.mismatches.append(f"{where}: {len(a)} against {len(b)} items")
            for i, (x, y) in enumerate(zip(a, b)):
                self.walk(f"{where}[{i}]", x, y)
        elif a != b:
            self.mismatches.append(f"{where}: {a!r} against {b!r}")


def compare_tensors(a: Path, b: Path, name: str, diff: Diff) -> bool:
    """Where two safetensors files' bytes differ: are their contents the same (metadata as a dict,
    every tensor's dtype, shape and values)? The safetensors writer puts metadata keys in a
    per-process hash order, so two saves of the same content can differ in bytes once there are two
    keys (test_logits.safetensors has two). Otherwise the largest difference of any tensor goes to
    `diff`, and whatever else differs to its mismatches."""
    from safetensors import safe_open
    same = True
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata():
            diff.mismatches.append(f"{name}: metadata differs")
            same = False
        ka, kb = set(fa.keys()), set(fb.keys())
        if ka != kb:
            diff.mismatches.append(f"{name}: tensors {sorted(ka ^ kb)[:5]} in one only")
            same = False
        for k in sorted(ka & kb):
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.shape != y.shape or x.dtype != y.dtype:
                diff.mismatches.append(f"{name}/{k}: {x.dtype}{list(x.shape)} against {y.dtype}{list(y.shape)}")
                same = False
            elif not x.equal(y):
                same = False
                if x.is_floating_point():
                    d = (x.double() - y.double()).abs().max().item()
                else:
                    d = (x.long() - y.long()).abs().max().item()
                diff.number(f"{name}/{k}", 0.0, float(d))
    return same


# Result records beside metrics.jsonl and test_metrics.json whose numbers count (model.json: classes,
# sizes, head; the others: what pruning, QAT and distillation measured on their way).
RECORDS = ("test_metrics.json", "model.json", "prune.json", "qat.json", "distill.json")
# Files compared by sha256 (safetensors ones, where the bytes differ, by content: compare_tensors).
FILES = ("model.safetensors", "test_logits.safetensors", "test_predictions.csv", "export/model.int8.onnx")


def same_onnx(a: Path, b: Path) -> bool:
    """Whether two ONNX files hold the same model once the exporter's stack traces are left out: they
    name the source files of the tree that exported them (/work/base/graftnet/heads.py), so the
    bytes, and the file size qat.json records, differ between trees by the length of that path."""
    import onnx

    def stripped(path: Path) -> bytes:
        model = onnx.load(str(path))
        for node in model.graph.node:
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
        return model.SerializeToString(deterministic=True)
    return stripped(a) == stripped(b)


# Keys of RECORDS that follow from a file compared by content above, not by its bytes.
SKIP_RECORD_KEYS = {"qat.json": ("size_bytes",)}


def normalised(obj, places: list[tuple[str, str]]):
    """`obj` with the folders that differ between the two sides by design (the run, the tree's work
    folder, the tree) written as placeholders in every string."""
    if isinstance(obj, str):
        for path, name in places:
            obj = obj.replace(path, name)
        return obj
    if isinstance(obj, dict):
        return {k: normalised(v, places) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normalised(v, places) for v in obj]
    return obj


def compare_runs(a: Path, b: Path, places_a: list, places_b: list) -> dict:
    """`places_*`: (folder, placeholder) pairs of each side, see normalised()."""
    pa_, pb_ = [(str(a), "<run>"), *places_a], [(str(b), "<run>"), *places_b]
    diff = Diff()
    for run in (a, b):
        if not (run / "model.safetensors").is_file():
            diff.mismatches.append(f"{run}: no model.safetensors")
    rows_a = [{k: v for k, v in r.items() if k not in SKIP_ROW_KEYS} for r in read_rows(a)]
    rows_b = [{k: v for k, v in r.items() if k not in SKIP_ROW_KEYS} for r in read_rows(b)]
    diff.walk("metrics.jsonl", rows_a, rows_b)
    for name in RECORDS:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file():
            diff.mismatches.append(f"{name}: in one run only")
        elif fa.is_file():
            ra, rb = (json.loads(f.read_text()) for f in (fa, fb))
            for key in SKIP_RECORD_KEYS.get(name, ()):
                ra.pop(key, None), rb.pop(key, None)
            diff.walk(name, normalised(ra, pa_), normalised(rb, pb_))
    files = {}
    for name in FILES:
        ha, hb = sha256(a / name), sha256(b / name)
        if ha is None and hb is None:
            continue
        files[name] = {"sha256_base": ha, "sha256_new": hb, "same": ha == hb}
        if ha != hb:
            if name.endswith(".safetensors") and ha and hb:
                files[name]["same_content"] = compare_tensors(a / name, b / name, name, diff)
            elif name.endswith(".onnx") and ha and hb and same_onnx(a / name, b / name):
                files[name]["same_content"] = True
            else:
                diff.mismatches.append(f"{name}: bytes differ")
    # The resolved config is reported, not judged: a new key with its default changes no result.
    import yaml
    config = Diff()
    ca, cb = (yaml.safe_load((r / "config.yaml").read_text()) if (r / "config.yaml").is_file() else {}
              for r in (a, b))
    ca.pop("name", None)  # the run folder's name, different in the within-tree comparison
    cb.pop("name", None)
    config.walk("config.yaml", normalised(ca, pa_), normalised(cb, pb_))
    config_notes = config.mismatches + ([f"{config.where}: numbers differ"] if config.unequal else [])
    test = {}
    for run, key in ((a, "base"), (b, "new")):
        p = run / "test_metrics.json"
        test[key] = json.loads(p.read_text()).get("accuracy") if p.is_file() else None
    identical = (not diff.mismatches and diff.unequal == 0
                 and all(f["same"] or f.get("same_content") for f in files.values()))
    return {"identical": identical, "max_abs_diff": diff.max_abs, "max_abs_diff_at": diff.where,
            "values_unequal": diff.unequal, "mismatches": diff.mismatches[:20],
            "fails": bool(diff.mismatches) or diff.max_abs > TOLERANCE, "config_differences": config_notes[:20],
            "epochs": [len(rows_a), len(rows_b)], "test_accuracy": test, "files": files}

# ---------------------------------------------------------------------------------------------------
# the record


def git_state(tree: Path) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout
    status = git("status", "--porcelain").splitlines()
    state = {"path": str(tree), "commit": git("rev-parse", "HEAD").strip() or None, "dirty": bool(status)}
    if status:  # which uncommitted state was measured: changed paths, a digest of the tracked files' diff
        state["changed"] = len(status)
        state["diff_sha256"] = hashlib.sha256(git("diff", "HEAD").encode()).hexdigest()[:16]
    return state


def machine() -> dict:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    # The extensions that decide which kernels torch picks (and so the last bits of a float).
    wanted = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    import torch
    return {"cpu": model or platform.processor(), "flags": [f for f in wanted if f in flags],
            "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "loadavg_start": loadavg()}


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load: on a shared machine, how busy it was (what wall times suffered)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fmt_diff(r: dict) -> str:
    note = f" (not judged: {r['config_differences'][0]})" if r["config_differences"] else ""
    if r["identical"]:
        return "identical" + note
    parts = []
    if r["values_unequal"]:
        parts.append(f"max abs diff {r['max_abs_diff']:.3g} ({r['max_abs_diff_at']})")
    if r["mismatches"]:
        parts.append("; ".join(r["mismatches"][:2]))
    if not parts:
        parts.append("files differ: " + ", ".join(k for k, f in r["files"].items()
                                                  if not (f["same"] or f.get("same_content"))))
    return ("**DIFFERS** " if r["fails"] else "") + "; ".join(parts) + note


def table(results: list[dict]) -> str:
    lines = ["| scenario | compared | result | test acc base / new | base s | new s | new/base | CPU new/base |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        acc = r["test_accuracy"]
        accs = " / ".join("-" if acc[k] is None else f"{acc[k]:.4f}" for k in ("base", "new"))
        ts = r.get("seconds")
        cr = (r.get("cpu_seconds") or {}).get("ratio")
        times = (f"{ts['base']:.1f} | {ts['new']:.1f} | {ts['ratio']:.2f} | " + ("-" if cr is None else f"{cr:.2f}")
                 if ts else " |  |  | ")
        lines.append(f"| {r['scenario']} | {r['compared']} | {fmt_diff(r)} | {accs} | {times} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="source tree that is the reference")
    ap.add_argument("--new", required=True, help="source tree compared with it")
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg.zip",
                    help="CIFAR-10 class folders (relative paths: to the repository root)")
    ap.add_argument("--out", default="bench/results/equivalence.json",
                    help="result JSON (relative paths: to the repository root)")
    ap.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), help="only these (default: all)")
    ap.add_argument("--work", help="folder for both trees' runs and caches (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (default: removed at the end)")
    args = ap.parse_args()

    base, new = Path(args.base).resolve(), Path(args.new).resolve()
    data = (ROOT / args.data).resolve()
    out = (ROOT / args.out).resolve()
    for tree in (base, new):
        if not (tree / "graftnet" / "cli.py").is_file():
            ap.error(f"{tree}: not a graftnet tree (no graftnet/cli.py)")
    if not data.exists():
        ap.error(f"{data}: no such data")
    wanted = set(args.scenarios or SCENARIOS)
    for name in list(wanted):
        wanted.update(SCENARIOS[name][1])
    names = [n for n in SCENARIOS if n in wanted]

    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="graftnet-equivalence-"))
    work.mkdir(parents=True, exist_ok=True)
    trees = {"base": Tree("base", base, work, data), "new": Tree("new", new, work, data)}
    for t in trees.values():
        if any(t.runs.iterdir()):
            ap.error(f"{t.runs} is not empty: give a fresh --work")
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "trees": {k: git_state(t.path) for k, t in trees.items()},
              "data": str(data), "tolerance": TOLERANCE, "scenarios": {}, "results": []}
    print(f"base {base} ({record['trees']['base']['commit']}), new {new} ({record['trees']['new']['commit']}); "
          f"work folder {work}", flush=True)

    # Untimed warm-up: the first command would otherwise pay for loading torch and the data file
    # from disk, and it is always base's; it also checks now that each tree imports its graftnet.
    for t in trees.values():
        t.graft("backbones")
        t.wall = t.cpu = 0.0
    if data.is_file():
        with open(data, "rb") as fh:
            while fh.read(1 << 24):
                pass

    done: dict[str, dict] = {"base": {}, "new": {}}
    results = []
    t_start = time.perf_counter()
    try:
        for i, name in enumerate(names):
            fn, _, description = SCENARIOS[name]
            record["scenarios"][name] = description
            seconds, cpu, notes = {}, {}, {}
            # Interleaved, so that a slow spell of the machine falls on both trees, and which goes
            # first alternates, so that what the second one finds warm evens out over the set.
            order = ["base", "new"] if i % 2 == 0 else ["new", "base"]
            for label in order:
                t = trees[label]
                print(f"[{time.perf_counter() - t_start:6.0f}s] {name} ({label}) ...", flush=True)
                wall0, cpu0 = t.wall, t.cpu
                done[label][name], notes[label] = fn(t, done[label])
                seconds[label], cpu[label] = t.wall - wall0, t.cpu - cpu0
            for artifact in done["base"][name]:
                r = compare_runs(done["base"][name][artifact], done["new"][name][artifact],
                                 trees["base"].places, trees["new"].places)
                r.update(scenario=name, compared=f"base vs new ({artifact})",
                         seconds={**{k: round(v, 2) for k, v in seconds.items()},
                                  "ratio": round(seconds["new"] / seconds["base"], 3)},
                         cpu_seconds={**{k: round(v, 2) for k, v in cpu.items()},
                                      "ratio": round(cpu["new"] / cpu["base"], 3) if cpu["base"] else None})
                if any(notes.values()):
                    r["notes"] = notes
                results.append(r)
            if name in WITHIN and WITHIN[name] in done["base"]:
                ref = WITHIN[name]
                for label, t in trees.items():
                    r = compare_runs(done[label][ref]["run"], done[label][name]["run"], t.places, t.places)
                    r.update(scenario=name, compared=f"within {label}: {ref} vs {name}")
                    results.append(r)
            print(f"         {name}: " + "; ".join(fmt_diff(r) + f" [{r['compared']}]" for r in results
                                                  if r["scenario"] == name), flush=True)
    finally:
        record["results"] = results
        record["seconds_total"] = {k: round(t.wall, 1) for k, t in trees.items()}
        record["cpu_seconds_total"] = {k: round(t.cpu, 1) for k, t in trees.items()}
        record["complete"] = len({r["scenario"] for r in results}) == len(names)
        record["machine"]["loadavg_end"] = loadavg()
        atomic_write_json(out, record)
        if args.keep or not record["complete"]:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(results))
    tot, cpu = record["seconds_total"], record["cpu_seconds_total"]
    print(f"\nper tree: wall base {tot['base']:.0f}s, new {tot['new']:.0f}s"
          + (f" (new/base {tot['new'] / tot['base']:.2f})" if tot["base"] else "")
          + f"; CPU base {cpu['base']:.0f}s, new {cpu['new']:.0f}s"
          + (f" (new/base {cpu['new'] / cpu['base']:.2f})" if cpu["base"] else ""))
    print(f"written: {out}")
    failing = [r for r in results if r["fails"]]
    if failing:
        print("\nDIFFERENT beyond 1e-6:")
        for r in failing:
            print(f"  {r['scenario']} [{r['compared']}]: {fmt_diff(r)}")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
