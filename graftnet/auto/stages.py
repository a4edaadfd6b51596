"""The stages of `graft auto` after the probe, each a function of the base config and what the
earlier stages decided, returning the numbers its decision was made on (they go to decisions.json).

search    the head and feature taps by `graft search` on cached features, within its time share;
finetune  the search's best run with its backbone unfrozen, for the epochs the plan found time for;
          kept only when its validation accuracy beats the head's;
export    fp32 and int8 ONNX models of the kept run, each with its validation accuracy and its
          latency measured in ONNX Runtime; of those within --max-latency-ms, the fastest within 0.5
          points of the most accurate ships, with test-time flips when they pay and fit;
test      the shipped file scored on the test split, once.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..config import RunConfig, resolve
from ..errors import GraftError
from ..progress import log
from ..search import DEFAULT_SPACE, run_search
from ..search.measure import measure_run
from ..search.trial import saved_val_acc
from ..train.pipeline import train
from .budget import StopAtDeadline, shown
from .plan import IMBALANCED

MAX_TRIALS = 200          # the search stops on its time share long before this on real data
MAX_INT8_DROP = 0.005     # validation accuracy int8 may lose against fp32 and still ship (0.5 points)
MIN_TTA_GAIN = 0.005      # test-time flips double the latency: worth it from 0.5 points of validation accuracy
LATENCY_TIE = 1.10        # latencies this close count as equal when choosing what ships
FINETUNE_BATCH = 64       # images per step when fine-tuning: fits a CPU's memory at 224 px


def search_space(n_train: int) -> dict:
    """The default space, with batch sizes that leave a small set several steps per epoch."""
    space = dict(DEFAULT_SPACE)
    batches = [b for b in (32, 64, 128, 256, 512) if b <= max(32, n_train // 4)][-3:]
    space["train.batch_size"] = {"type": "categorical", "choices": batches}
    return space


def search(base: RunConfig, folder: Path, seconds: float, n_train: int, command: str, resume: bool) -> dict:
    """The head search; its trials stop starting `seconds` from now (the first one runs whatever it
    takes: it fills the feature cache). The best trial is not scored on the test split here."""
    began = time.monotonic()
    if resume and (folder / "base.yaml").is_file():
        summary = run_search(None, None, folder, MAX_TRIALS, seconds, resume=True, command=command, test=False)
    else:
        summary = run_search(base, search_space(n_train), folder, MAX_TRIALS, seconds, command=command, test=False)
    if summary["run"] is None:
        raise GraftError(f"{folder}: no search trial completed, so there is no model to ship; a larger "
                         "--budget gives the search time for one")
    return {"run": summary["run"], "val_acc": summary["val_accuracy"], "best_trial": summary["best_trial"],
            "trials": summary["trials_done"], "params": summary["params"],
            "seconds": round(time.monotonic() - began, 1)}


def finetune(best_run: str, folder: Path, epochs: int, deadline: float, resume: bool) -> dict:
    """The best trial's model with its backbone unfrozen for `epochs` (stage 2 alone, from the
    trial's weights); ends early at the epoch that would cross `deadline`."""
    run = folder / "finetune"
    stop = StopAtDeadline(deadline)
    if resume and (run / "config.yaml").is_file() and not (run / "model.safetensors").is_file():
        result = train(None, resume=run, callbacks=[stop], test=False)   # on from its last checkpoint
    else:
        cfg = resolve(Path(best_run) / "config.yaml", {
            "out": str(folder), "name": "finetune", "train.init": str(best_run), "train.epochs": 0,
            "finetune.epochs": epochs, "finetune.batch_size": FINETUNE_BATCH})
        result = train(cfg, callbacks=[stop], test=False)
    cfg = resolve(result.run_dir / "config.yaml")
    rows = [r for r in result.history if r.get("stage") == "fine-tuning"]
    return {"run": str(result.run_dir), "val_acc": saved_val_acc(cfg, rows or result.history),
            "epochs_run": len(rows), "stopped_at_deadline": stop.stopped}


def measure(run: str | Path) -> dict:
    """fp32 and int8 ONNX models of the run: {"fp32": {...}, "int8": {...}} with validation accuracy,
    latency at batch 1 (median, ms) and size; int8's quantization may fail, recorded as its error."""
    run = Path(run)
    cfg = resolve(run / "config.yaml")
    val_acc = saved_val_acc(cfg, _history(run))
    out = {"fp32": {**measure_run(run, int8=False), "val_acc": val_acc}}
    try:
        out["int8"] = measure_run(run, int8=True)
        out["int8"]["val_acc"] = out["int8"].pop("val_acc_int8")
    except (GraftError, RuntimeError, ValueError) as e:   # ORT's quantizer raises its own types
        out["int8"] = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    return out


def _history(run: Path) -> list[dict]:
    from ..run import read_history
    return read_history(run)


def flip_accuracy(run: str | Path, model: str | Path) -> float:
    """Validation accuracy of an exported model averaging each image's logits with its mirror's
    (test-time augmentation, as `preprocess.json`'s flip_average asks of every runtime)."""
    from ..export.control import Validation
    from ..export.quantize import fp32_model
    spec, cfg, _, pre = fp32_model(run)
    val = Validation.of_run(cfg, spec, pre, Path(run))
    val.flip = True
    return val.accuracy(Path(model))


def tta(model: dict, run: str | Path, left: float, cost: float, max_latency_ms: float | None) -> dict:
    """Flip test-time augmentation for the chosen `model`, tried when the `left` seconds hold its
    `cost` (two validation passes; the plan's rate with a margin) and the latency bound room for
    twice the latency; used from MIN_TTA_GAIN of validation accuracy."""
    if left < cost:
        return {"used": False, "why": f"test-time flips not tried: {shown(left)} left, they need about {shown(cost)}"}
    if max_latency_ms is not None and 2 * model["latency_ms"] > max_latency_ms:
        return {"used": False, "why": "test-time flips not tried: twice the latency would exceed --max-latency-ms"}
    flipped = flip_accuracy(run, model["model"])
    used = flipped >= model["val_acc"] + MIN_TTA_GAIN
    return {"used": used, "val_acc": flipped, "latency_ms": 2 * model["latency_ms"],
            "why": f"test-time flips {'used' if used else 'not used'}: validation accuracy {flipped:.4f} "
                   f"against {model['val_acc']:.4f} without, at twice the latency"}


def choose(models: dict, max_latency_ms: float | None) -> dict:
    """The model to ship: the fastest within MAX_INT8_DROP of the most accurate (int8, when it keeps
    fp32's accuracy, being the smaller and usually the faster; of two as fast, the smaller); only
    models within `max_latency_ms` count; when none is, the fastest ships and `meets` is False."""
    ok = {k: m for k, m in models.items() if "error" not in m and m.get("val_acc") is not None}
    if not ok:
        raise GraftError("no exported model could be measured")
    within = {k: m for k, m in ok.items() if max_latency_ms is None or m["latency_ms"] <= max_latency_ms}
    if not within:
        name = _fastest(ok)
        return {"model": name, "meets": False,
                "why": f"no model meets --max-latency-ms {max_latency_ms:g}: the fastest, {name}, takes "
                       f"{ok[name]['latency_ms']:.3g} ms; it ships anyway"}
    best = max(m["val_acc"] for m in within.values())
    good = {k: m for k, m in within.items() if m["val_acc"] >= best - MAX_INT8_DROP}
    name = _fastest(good)
    others = "; ".join(f"{k} {m['val_acc']:.4f}, {m['latency_ms']:.3g} ms" if "error" not in m else f"{k} failed"
                       for k, m in models.items() if k != name)
    why = (f"{name}: validation accuracy {ok[name]['val_acc']:.4f}, {ok[name]['latency_ms']:.3g} ms at batch 1"
           + (f" (within {max_latency_ms:g} ms)" if max_latency_ms is not None else "") + (f"; {others}" if others else ""))
    return {"model": name, "meets": True, "why": why}


def _fastest(models: dict) -> str:
    """The fastest model's name; latencies within LATENCY_TIE of each other are one speed (the next
    measurement may order them the other way), and of those the smaller file wins."""
    fastest = min(m["latency_ms"] for m in models.values())
    return min((k for k, m in models.items() if m["latency_ms"] <= LATENCY_TIE * fastest),
               key=lambda k: (models[k].get("size_mb", 0.0), models[k]["latency_ms"]))


def test_score(model_path: str | Path, run: str | Path) -> dict | None:
    """The shipped file's metrics on the run's test split (accuracy with its 95% interval, per class);
    None when the split is not readable."""
    from ..export.quantize import held_out_images
    from ..export.runtime import OnnxClassifier
    from ..metrics import classification_metrics
    from ..model import load_model
    _, spec = load_model(run)
    images = held_out_images(resolve(Path(run) / "config.yaml"), spec, "test")
    if images is None:
        return None
    logits = OnnxClassifier(model_path).logits([im.numpy() for im in images.images])
    metrics = classification_metrics(torch.from_numpy(logits), images.labels, list(spec.classes))
    metrics.pop("confusion", None)
    return metrics


def base_config(cfg: RunConfig, chosen: dict, data: dict) -> RunConfig:
    """The probe's backbone and size on the user's base config; imbalanced classes weigh the loss, and
    unreadable files (the look reads only a sample) are left out and listed in each run's skipped.txt
    rather than failing every trial."""
    weights = "balanced" if data["imbalance"] > IMBALANCED else cfg.train.class_weights
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, name=chosen["backbone"], image_size=chosen["image_size"]),
        train=dataclasses.replace(cfg.train, class_weights=weights),
        data=dataclasses.replace(cfg.data, skip_bad=True))


def note(stage: str, message: str) -> None:
    log(f"auto: {stage}: {message}")
