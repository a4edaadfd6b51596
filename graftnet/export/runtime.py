"""Run an exported model with ONNX Runtime, PIL and numpy: no torch on this path.

An exported model folder holds model.onnx (and model.int8.onnx) beside preprocess.json, which says
how to turn an image into the model's input. The preprocessing repeats training's exactly:
`square_array` (data/pixels.py, shared with training) crops and shrinks to uint8, then the bilinear
resize and normalisation of `data/images.to_batch` are done here with PIL's float ("F") images,
which use the same antialiased bilinear kernel as torch's `F.interpolate(antialias=True)` (torch
ported it from PIL), so the two paths agree to float rounding.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.pixels import list_images, predict_files
from ..errors import GraftError
from ..multilabel import labels_above

PREPROCESS_FILE = "preprocess.json"


def read_preprocess(model_path: str | Path) -> dict:
    """preprocess.json beside an exported model, checked for the keys the predictor needs."""
    path = Path(model_path).parent / PREPROCESS_FILE
    if not path.is_file():
        raise GraftError(f"{path}: missing; an exported model needs its preprocess.json beside it "
                         "(written by `graft export`)")
    try:
        pre = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GraftError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("classes", "image_size", "mean", "std", "input_name") if k not in pre]
    if missing:
        raise GraftError(f"{path}: missing key(s) {', '.join(missing)}")
    return pre


def model_file(run_or_file: str | Path) -> Path:
    """An .onnx file as given, or a run folder's exported RUN/export/model.onnx."""
    path = Path(run_or_file)
    if path.is_dir():
        if not (path / "export" / "model.onnx").is_file():
            raise GraftError(f"{path}: no exported model (export/model.onnx); run `graft export {path}` "
                             "first")
        return path / "export" / "model.onnx"
    if not path.is_file():
        raise GraftError(f"{path}: no such ONNX model or run folder")
    return path


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 3 x s x s -> float32 3 x size x size, as `to_batch` resizes (bilinear, half-pixel
    centres, antialiased when shrinking)."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image.astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((size, size),
                                                                                 Image.BILINEAR))
                     for c in image])


def to_input(images: list[np.ndarray], pre: dict) -> np.ndarray:
    """uint8 squares -> the normalised float32 NCHW batch the exported model takes."""
    size = pre["image_size"]
    x = np.stack([resize_bilinear(im, size) for im in images])
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1) * 255
    std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1) * 255
    return (x - mean) / std


def session(model_path: str | Path, threads: int | None = None):
    import onnxruntime as ort
    path = Path(model_path)
    if not path.is_file():
        raise GraftError(f"{path}: no such ONNX model")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise GraftError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None


class OnnxClassifier:
    """An exported model and its preprocessing. `logits(images)` takes uint8 squares (3 x s x s)."""

    def __init__(self, model_path: str | Path, threads: int | None = None):
        self.path = model_file(model_path)
        self.pre = read_preprocess(self.path)
        self.session = session(self.path, threads)
        self.classes: list[str] = self.pre["classes"]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.pre["input_name"]: x})[0]

    def logits(self, images: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = to_input(images[i:i + batch_size], self.pre)
            y = self.run(x)
            if self.pre.get("flip_average"):  # the run averaged the mirror's logits in (flip_views)
                y = (y + self.run(np.ascontiguousarray(x[..., ::-1]))) / 2
            out.append(y)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict_onnx(model_path: str | Path, target: str | Path, top: int = 3, batch_size: int = 64,
                 threads: int | None = None) -> list[dict]:
    """Classify an image or a folder with an exported model (an .onnx file, or a run folder's
    export/model.onnx); the same records as
    `evaluation.predict`: file, class, probability, top [{class, probability}], or file, error
    for a file in a folder that cannot be read or decoded."""
    clf = OnnxClassifier(model_path, threads)

    def classify(paths: list[Path], squares: list[np.ndarray]) -> list[dict]:
        logits = clf.logits(squares, batch_size)
        if clf.pre.get("multilabel"):  # each label's sigmoid, kept where it reaches the label's threshold
            return [{"file": str(path), **labels_above(1 / (1 + np.exp(-row)), clf.classes, clf.pre.get("thresholds"), top)}
                    for path, row in zip(paths, logits)]
        results = []
        for path, p in zip(paths, softmax(logits)):
            idx = np.argsort(-p, kind="stable")[:min(top, len(clf.classes))]
            results.append({"file": str(path), "class": clf.classes[idx[0]],
                            "probability": round(float(p[idx[0]]), 6),
                            "top": [{"class": clf.classes[i], "probability": round(float(p[i]), 6)}
                                    for i in idx]})
        return results
    return predict_files(target, list_images(target), clf.pre["image_size"], clf.pre.get("color") == "gray",
                         classify)


def evaluate_onnx(model_path: str | Path, images, batch_size: int = 64,
                  threads: int | None = None, advance=lambda n: None) -> dict:
    """Accuracy of an exported model on an ImageSet (data/images.py; its uint8 squares and labels):
    {"accuracy", "n", "correct", "predictions" (class indices)}. `advance(n)` after each batch (a
    caller's progress bar: this module stays free of torch, which graftnet.progress imports)."""
    clf = OnnxClassifier(model_path, threads)
    if clf.pre.get("multilabel"):
        raise GraftError(f"{model_path}: a multi-label model; its accuracy check scores one class per image")
    if list(images.classes) != list(clf.classes):
        raise GraftError(f"{model_path}: the model's classes {clf.classes} differ from the data's "
                         f"{list(images.classes)}")
    preds = [np.zeros(0, np.int64)]
    for i in range(0, len(images), batch_size):
        part = [im.numpy() for im in images.images[i:i + batch_size]]
        preds.append(clf.logits(part, batch_size).argmax(1))
        advance(len(part))
    preds = np.concatenate(preds)
    labels = np.asarray(images.labels)
    correct = int((preds == labels).sum())
    return {"accuracy": correct / max(len(labels), 1), "n": int(len(labels)), "correct": correct,
            "predictions": preds.tolist()}


def timed_runs(clf_session, batch_size: int, repeats: int, warmup: int = 3, seed: int = 0) -> list[float]:
    """Milliseconds of each of `repeats` runs of an ORT session on one random batch, after `warmup`."""
    inp = clf_session.get_inputs()[0]
    size = [d if isinstance(d, int) else batch_size for d in inp.shape]
    size[0] = batch_size
    feed = {inp.name: np.random.default_rng(seed).standard_normal(size).astype(np.float32)}
    for _ in range(warmup):
        clf_session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        clf_session.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return times


def measure_latency(model_path: str | Path, batch_size: int = 1, repeats: int = 20, warmup: int = 3,
                    threads: int | None = None, seed: int = 0) -> dict:
    """Wall time of one ORT run on a random normalised batch (the model alone, no decoding):
    {"median_ms", "min_ms", "max_ms", "per_image_ms", "batch_size", "repeats"}."""
    times = timed_runs(session(model_path, threads), batch_size, repeats, warmup, seed)
    median = statistics.median(times)
    return {"median_ms": median, "min_ms": min(times), "max_ms": max(times),
            "per_image_ms": median / batch_size, "batch_size": batch_size, "repeats": repeats}


TURN_ROUNDS = 5   # rounds of a timing in turns
# Before each model's runs in turns: after its last run, the previous model's ONNX Runtime session
# keeps its worker threads spinning for work for a while, and on 2 cores they take a core from the
# next model. Measured (bench/turns.py, Lite0 at 160 px): timed in turns right after the other,
# int8 took 1.26x its time alone and fp32 1.18x; with this pause, 1.02x and 1.00x.
TURN_PAUSE_S = 0.05


def timed_in_turns(models: dict, batch_size: int = 1, rounds: int = TURN_ROUNDS, repeats: int = 20,
                   pause: float = TURN_PAUSE_S, gap: float = 0.0) -> dict:
    """{key: [median ms of each round]}: every model timed again, all of them in turns, `rounds`
    rounds of `repeats` runs each. A trial's own timing is one moment of the machine, and the
    moments differ: on a 2-core CPU one network timed 0.49 ms in one trial and 0.90 ms in another,
    which put a slower network on the front in its place. Timed in turns, every model sees the same
    moments; `pause` seconds before each model's runs let the previous session's threads rest, and
    `gap` seconds between rounds spread them over more of the machine's moments."""
    sessions = {k: session(path) for k, path in models.items()}   # opened once: loading is not timed
    medians: dict = {k: [] for k in models}
    for r in range(rounds):
        if r and gap:
            time.sleep(gap)
        for k, sess in sessions.items():
            if len(sessions) > 1:
                time.sleep(pause)
            medians[k].append(statistics.median(timed_runs(sess, batch_size, repeats, warmup=3 if r == 0 else 1)))
    return medians


# the child imports this module alone (ONNX Runtime and numpy: 0.2 s, where graftnet.search's imports take 4)
_RETIME_CHILD = ("import json, sys\nfrom graftnet.export.runtime import timed_in_turns\na = json.loads(sys.argv[1])\n"
                 "print(json.dumps(timed_in_turns(a['models'], a['batch'], a['rounds'], a['repeats'], gap=a['gap'])))")


def retime_apart(models: dict, batch_size: int = 1, rounds: int = TURN_ROUNDS, repeats: int = 20,
                 gap: float = 0.0) -> dict:
    """timed_in_turns ({str key: path} -> {key: [ms of each round]}) in a fresh Python process, so
    that nothing a long-lived process holds shares the cores: inside `graft auto`, after its search
    and fine-tuning, an int8 export timed 2.54 ms in turns seconds after 1.55 ms once (the machine
    itself was the likelier cause: the next run in a child process saw the same, BENCHMARKS.md, but
    a timing should depend on the model and the machine only). The child costs about 2 s."""
    import json
    import os
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    arg = json.dumps({"models": {k: str(v) for k, v in models.items()}, "batch": batch_size,
                      "rounds": rounds, "repeats": repeats, "gap": gap})
    done = subprocess.run([sys.executable, "-c", _RETIME_CHILD, arg], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GraftError(f"timing {len(models)} model(s) in a separate process failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])
