"""End to end through the `graft` command on a slice of the real CIFAR-10 copy, offline."""
import json
import sys

import pytest

from graftnet.cli import main

from .conftest import CIFAR_ZIP, needs_cifar


@needs_cifar
def test_train_evaluate_predict_on_cifar_slice(tmp_path, capsys, monkeypatch):
    run = tmp_path / "runs" / "slice"
    code = main(["train", "--config", "recipes/paper-cifar10.yaml", "--data", str(CIFAR_ZIP),
                 "--max-per-class", "30", "--image-size", "64", "--epochs", "4",
                 "--out", str(tmp_path / "runs"), "--name", "slice", "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip() == str(run)
    assert "precision" in out.err and "confusion" in out.err  # tables in the terminal
    train_acc = json.loads((run / "test_metrics.json").read_text())["accuracy"]
    assert train_acc > 0.2  # 10 classes, 270 training images: the pretrained backbone beats chance

    monkeypatch.setattr(sys, "argv", ["graft", "evaluate", str(run)])
    assert main(["evaluate", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 300 and result["accuracy"] == pytest.approx(train_acc, abs=1e-6)
    folder = run / "evaluations" / CIFAR_ZIP.stem
    assert (folder / "report.html").is_file()
    # the evaluation's own environment (its command), and the training run's beside it
    assert json.loads((folder / "environment.json").read_text())["command"] == f"graft evaluate {run}"
    assert (folder / "training_environment.json").read_bytes() == (run / "environment.json").read_bytes()
    _check_predictions(folder, result, n_per_class=30)

    # predict: a folder of images -> JSON with class and probabilities
    import zipfile
    folder = tmp_path / "imgs"
    folder.mkdir()
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        for name in ("cifar10/test/ship/0000.jpg", "cifar10/test/frog/0000.jpg"):
            (folder / name.replace("/", "_")).write_bytes(zf.read(name))
    assert main(["predict", str(run), str(folder), "--json", "--top", "3"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 2
    for p in preds:
        assert p["class"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                              "ship", "truck")
        assert len(p["top"]) == 3 and p["top"][0]["probability"] >= p["top"][1]["probability"]
        assert 0 < p["probability"] <= 1
    assert main(["predict", str(run), str(folder / "cifar10_test_ship_0000.jpg")]) == 0
    out = capsys.readouterr().out
    assert "predictions (1 image)" in out and "ship_0000" in out


def _check_predictions(folder, metrics, n_per_class):
    """The per-image files agree with the metrics: one row per test image, in the logits' order."""
    import csv

    from safetensors import safe_open
    rows = list(csv.DictReader((folder / "test_predictions.csv").open()))
    with safe_open(folder / "test_logits.safetensors", "pt") as f:
        logits, labels = f.get_tensor("logits"), f.get_tensor("labels").tolist()
        classes = json.loads(f.metadata()["classes"])
    assert len(rows) == metrics["n"] == len(logits) == len(labels)
    assert len({r["file"] for r in rows}) == len(rows)
    for c in classes:  # the test split's files, each under its own class's folder
        assert sum(r["true"] == c for r in rows) == n_per_class
    assert all(r["file"].startswith(f"cifar10/test/{r['true']}/") for r in rows)
    assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(metrics["accuracy"], abs=1e-9)
    for r, p, y in zip(rows, logits.argmax(1).tolist(), labels):
        assert (r["true"], r["predicted"], int(r["correct"])) == (classes[y], classes[p], int(p == y))
        assert float(r["p_predicted"]) >= float(r["p_true"]) - 1e-6


def test_backbones_lists_offline_entries(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")   # a plain terminal: no name may be cut short
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for n in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert f"{n} " in out and f"tf_{n} " in out
    vgg = next(line for line in out.splitlines() if line.startswith("vgg16 "))
    assert "ImageNet" in vgg and "offline" in out and "yes" in out


def test_preview_writes_png(split_folder, tmp_path):
    from PIL import Image
    out = tmp_path / "preview.png"
    assert main(["preview", "--data", str(split_folder), "--out", str(out), "-n", "9"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_unknown_backbone_and_bad_config_are_one_line_errors(image_folder, tmp_path, capsys):
    assert main(["train", "--data", str(image_folder), "--backbone", "efficientnet_lite9",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("config.yaml")]  # a run that never started leaves no folder
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["train", "--data", str(image_folder), "--set", "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_predict_on_unfinished_run_is_explained(tmp_path, capsys):
    assert main(["predict", str(tmp_path), str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
