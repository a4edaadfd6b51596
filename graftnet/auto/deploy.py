"""The deployment folder `graft auto` leaves: AUTO/model.onnx (fp32), AUTO/model.int8.onnx (when int8
keeps the validation accuracy), AUTO/model.ensemble[.int8].onnx (when an ensemble ships),
preprocess.json (naming the file that ships), test_metrics.json,
MODEL_CARD.md (the run's card with what auto decided and the command that remakes it), report.html
(a section per stage) and decisions.json; the run folders it came from stay under AUTO/search and
AUTO/finetune.

The test split is scored here, once, for the shipped file only; a resumed deploy that ships the same
file reads that score back.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import yaml

from ..features import cpu_name
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..report.card import CARD_FILE, render_card
from ..report.html import write_report
from ..run import read_history
from . import stages
from .budget import shown

FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx",
         "ensemble-fp32": "model.ensemble.onnx", "ensemble-int8": "model.ensemble.int8.onnx"}


def write_deployment(folder: Path, decisions: dict, exported: dict, command: str,
                     report_only: bool = False) -> dict:
    """Writes the folder's files; returns what the deploy stage records."""
    folder, run = Path(folder), Path(exported["run"])
    if report_only:
        _report(folder, decisions, run)
        return {}
    models, shipped = exported["models"], exported["model"]
    int8 = models.get("int8", {})
    keep_int8 = "error" not in int8 and (shipped == "int8" or int8.get("val_acc", -1) >= models["fp32"]["val_acc"]
                                         - stages.MAX_INT8_DROP)
    copied = {"fp32", shipped} | ({"int8"} if keep_int8 else set())
    for name in FILES:
        if name in copied:
            atomic_write_bytes(folder / FILES[name], Path(models[name]["model"]).read_bytes())
        else:
            (folder / FILES[name]).unlink(missing_ok=True)   # an earlier attempt's file would pass for this one's
    pre = json.loads((run / "export" / "preprocess.json").read_text())
    tta = (exported.get("tta") or {}).get("used", False)
    # flip_average: every runtime reading preprocess.json (graft predict, OnnxClassifier) averages the mirror in
    members = models[shipped].get("members")   # an ensemble: one file averaging its members' probabilities
    atomic_write_json(folder / "preprocess.json", {**pre, "model": FILES[shipped], "run": str(run),
                                                   "flip_average": bool(pre.get("flip_average") or tta),
                                                   **({"ensemble_members": members} if members else {})})
    metrics = _test_once(folder, FILES[shipped], f"{models[shipped]['model']}, flip_average {tta}", run)
    _card(folder, decisions, run, metrics, models, shipped, command, tta)
    acc = metrics["accuracy"] if metrics else None
    text = "-" if metrics is None else (f"{acc:.4f} (95% interval {metrics['accuracy_ci95'][0]:.4f}-"
                                        f"{metrics['accuracy_ci95'][1]:.4f}, {metrics['n']} images)")
    return {"model": FILES[shipped], "int8_kept": keep_int8, "run": str(run), "test_accuracy": acc,
            "test_accuracy_text": text, "meets_latency": exported["meets"],
            "latency_ms": models[shipped]["latency_ms"] * (2 if tta else 1), "tta": tta}


def _test_once(folder: Path, name: str, source: str, run: Path) -> dict | None:
    path = folder / "test_metrics.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("model_source") == source:
            return old
    metrics = stages.test_score(folder / name, run)
    if metrics is not None:
        metrics.update(model=name, model_source=source)
        atomic_write_json(path, metrics)
    return metrics


def _card(folder: Path, decisions: dict, run: Path, metrics: dict | None, models: dict, shipped: str,
          command: str, tta: bool) -> None:
    cpu = cpu_name() or platform.processor() or platform.machine()
    def how_timed(m: dict) -> str:   # stages.timed_together's entries carry their rounds' median too
        return "the fastest of 5 rounds' medians, timed in turns" if "latency_ms_median" in m else "median"
    latency = {f"ONNX Runtime {k}, batch 1, {how_timed(m)} ({cpu}, {os.cpu_count()} cores)": m["latency_ms"]
               for k, m in models.items() if "error" not in m}
    how = ["", "## How this model was made", "",
           f"By `graft auto` within a budget of {decisions['budget_s']:.0f} s on this machine; every decision "
           "with the numbers it was made on is in `decisions.json`, and `report.html` shows each stage.", ""]
    how += [f"- {name}: {s['decision']}" for name, s in decisions["stages"].items() if s.get("decision")]
    how += ["", f"Shipped file: `{FILES[shipped]}`; the run it came from: `{run}`.", "",
            "Remake it (the same stages and budget; timings, and so the choices, depend on the machine):", "",
            "```bash", command, "```", ""]
    if metrics is None:   # the card's layout needs test numbers; without them the decisions are the card
        atomic_write_text(folder / CARD_FILE, f"# Model card: {folder.name}\n\nNo test split was readable.\n"
                          + "\n".join(how))
        return
    env_path = run / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    text = render_card(folder.name, json.loads((run / "model.json").read_text()),
                       yaml.safe_load((run / "config.yaml").read_text()), metrics, read_history(run), env,
                       decisions["look"]["counts"], latency,
                       {"file": f"`{FILES[shipped]}` ({shipped}), with `preprocess.json` beside it",
                        **({"ensemble": f"{len(models[shipped]['members'])} fine-tuned models (seeds differ), class "
                            "probabilities averaged inside the one file; the card's training details are the "
                            "first's"} if models[shipped].get("members") else {}),
                        "test-time augmentation": "each image and its mirror, logits averaged (flip_average)"
                        if tta else "none"}, path=str(run))
    atomic_write_text(folder / CARD_FILE, text + "\n".join(how))


def _flat(value, prefix: str = "") -> list[list]:
    """Nested numbers as (key, value) rows: a.b.c -> 0.93."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flat(v, f"{prefix}{k}.")]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [row for i, v in enumerate(value) for row in _flat(v, f"{prefix}{i}.")]
    return [[prefix.rstrip("."), value if isinstance(value, (int, float)) else str(value)]]


def _report(folder: Path, decisions: dict, run: Path) -> None:
    result = decisions["stages"].get("deploy", {}).get("numbers") or {}
    metrics_path = folder / "test_metrics.json"
    test = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    summary = {"shipped": result.get("model", "-"), "test accuracy": result.get("test_accuracy", "-"),
               "latency (ms, batch 1)": result.get("latency_ms", "-"),
               "budget": shown(decisions["budget_s"]),
               "spent": shown(decisions["spent_s"]) if "spent_s" in decisions else "-"}
    tables = [(f"Stage: {name} ({s.get('status')}, {s.get('seconds', 0):.1f} s"
               + (f", expected {s['expected_s']:.0f} s" if s.get("expected_s") else "") + ")",
               s.get("decision", ""), ["number", "value"], _flat(s.get("numbers") or {}))
              for name, s in decisions["stages"].items()]
    tables.append(("Plan", "the budget's shares and the measured rates they came from", ["number", "value"],
                   _flat(decisions["plan"])))
    write_report(folder / "report.html", f"graft auto: {folder.name}", summary,
                 {"command": decisions["command"], "run": str(run)}, [], test, {},
                 decisions["look"]["classes"], tables=tables)
