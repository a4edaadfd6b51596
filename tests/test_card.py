"""MODEL_CARD.md: written with every finished run, its numbers the run's own, in the Hugging Face
layout (YAML metadata with model-index results, then the sections)."""
from __future__ import annotations

import json

import yaml

from graftnet.config import resolve
from graftnet.report.card import CARD_FILE, render_card
from graftnet.train.pipeline import train
from tests.conftest import make_folder, tiny_overrides


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_two_class_run_gets_a_card_with_its_numbers_and_the_screening_caution(tmp_path):
    data = make_folder(tmp_path / "xray", classes=("NORMAL", "PNEUMONIA"), n=12)
    run = train(resolve(None, tiny_overrides(data, tmp_path, name="xr", **{"train.epochs": 2})))
    text = (run.run_dir / CARD_FILE).read_text()
    metrics = json.loads((run.run_dir / "test_metrics.json").read_text())
    meta = front_matter(text)
    assert meta["library_name"] == "graftnet" and meta["pipeline_tag"] == "image-classification"
    results = {r["type"]: r["value"] for r in meta["model-index"][0]["results"][0]["metrics"]}
    assert results["accuracy"] == round(metrics["accuracy"], 4)
    if metrics["binary"]["auc"] is not None:
        assert results["roc_auc"] == round(metrics["binary"]["auc"], 4)
    lo, hi = metrics["accuracy_ci95"]
    assert f"{100 * lo:.2f}%–{100 * hi:.2f}%" in text
    for section in ("## Model details", "## Intended use", "## Training data", "## Evaluation",
                    "## Training procedure", "## Limitations and risks", "## How to use"):
        assert section in text
    assert "not a medical device" in text and "NORMAL vs PNEUMONIA" in text
    assert "graft train --config config.yaml" in text
    assert "randomly initialised" in text  # the tiny backbone has no pretrained weights: said so


def test_a_many_class_card_has_no_screening_caution_and_counts_what_it_was_given():
    spec = {"backbone": "efficientnet_lite0", "timm_name": "tf_efficientnet_lite0", "weights_id": "lite0-pypi",
            "classes": ["a", "b", "c"], "image_size": 128, "mean": [0.5] * 3, "std": [0.5] * 3,
            "features": "multi", "head": {"pool": "avg", "hidden": [256], "activation": "relu", "dropout": 0.5}}
    cfg = {"data": {"path": "/data/leaves", "split_seed": 0, "max_per_class": None},
           "train": {"epochs": 10, "optimizer": "adam", "lr": 1e-3, "batch_size": 128, "weight_decay": 0.0,
                     "label_smoothing": 0.0, "augment": "none", "seed": 3},
           "finetune": {"epochs": 2, "unfreeze": "top:2", "lr": 3e-4, "optimizer": "adamw"}}
    metrics = {"accuracy": 0.8, "accuracy_ci95": [0.7, 0.9], "n": 50, "top_k": {"top1": 0.8, "top3": 1.0},
               "macro": {"precision": 0.8, "recall": 0.8, "f1": 0.79},
               "per_class": [{"class": c, "precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 17} for c in "abc"],
               "int8": {"accepted": True, "test_int8": 0.79, "test_fp32": 0.8, "speedup_b1": 1.77}}
    text = render_card("leaves", spec, cfg, metrics, [{"epoch": 1, "val_acc": 0.75}, {"epoch": 2, "val_acc": 0.81}],
                       {}, {"train": 900, "test": 50}, latency={"ONNX Runtime, batch 1": 3.2})
    assert "medical" not in text
    assert "Dense 256 relu → Dropout 0.5 → Dense 3" in text
    assert "train 900, test 50" in text and "| top-3 accuracy | 100.00% |" in text
    assert "best validation accuracy 81.00%" in text and "graft finetune --config config.yaml" in text
    assert "| ONNX Runtime, batch 1 | 3.20 |" in text
    assert "| int8 ONNX model (`export/model.int8.onnx`) | 79.00% against 80.00% for fp32 ONNX, 1.77x" in text
    assert front_matter(text)["model-index"][0]["results"][0]["dataset"]["name"] == "leaves"


def test_an_export_carries_the_card_with_its_measured_latency(tmp_path, image_folder):
    from graftnet.export.exporter import export_run
    run = train(resolve(None, tiny_overrides(image_folder, tmp_path, name="r", **{"train.epochs": 1})))
    result = export_run(run.run_dir)
    card = (run.run_dir / "export" / CARD_FILE).read_text()
    assert "## Latency" in card and "ONNX Runtime fp32, batch 1" in card and "## This export" in card
    assert f"({result['size_bytes'] / 1e6:.1f} MB, onnx" in card
    metrics = json.loads((run.run_dir / "test_metrics.json").read_text())
    assert metrics["split_sizes"]["test"] == metrics["n"] and metrics["split_sizes"]["train"] > 0
    shown = ", ".join(f"{k} {v}" for k, v in metrics["split_sizes"].items() if v is not None)
    assert f"- Images: {shown}\n" in card
