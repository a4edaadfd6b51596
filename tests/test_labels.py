"""Label files (`--data DIR --labels labels.csv`): layouts, one-line errors naming the row, splits;
multi-label training with sigmoid outputs, thresholds chosen on validation, per-label metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .conftest import make_folder, make_multilabel_folder, tiny_overrides
from graftnet.cli import main
from graftnet.config import resolve
from graftnet.data.images import config_splits, load_images, make_splits
from graftnet.data.labels import open_label_file
from graftnet.errors import DataError
from graftnet.model import load_model
from graftnet.multilabel import choose_thresholds, multilabel_metrics


def write(root, text, name="labels.csv"):
    (root / name).write_text(text)
    return name


@pytest.fixture
def ml_folder(tmp_path):
    return make_multilabel_folder(tmp_path / "data", n=80)


# ---------------------------------------------------------------- reading

def test_multilabel_file_becomes_01_rows_and_stratified_splits(ml_folder):
    src = open_label_file(ml_folder, "labels.csv")
    assert src.multilabel and src.classes == ["blue", "green", "red", "yellow"]
    key, label = src.splits["all"][0]
    assert key.startswith("img/") and isinstance(label, tuple) and len(label) == 4
    splits = make_splits(src, 0.2, 0.2, 0)
    assert sum(len(v) for v in splits.values()) == 80
    assert not {k for k, _ in splits["test"]} & {k for k, _ in splits["train"]}
    assert make_splits(src, 0.2, 0.2, 0) == splits  # deterministic
    for name in ("train", "test"):  # the rarest-label proxy keeps every label in both
        assert all(any(lab[c] for _, lab in splits[name]) for c in range(4))
    images = load_images(src, splits["val"], 32, workers=1)
    assert images.labels.shape == (len(splits["val"]), 4) and images.labels.sum(1).min() >= 1


def test_single_label_file_is_an_ordinary_source(tmp_path):
    root = make_folder(tmp_path / "data", n=6)
    rows = [f"{c}/{i:03d}.png;{c}" for c in ("cat", "dog", "fox") for i in range(6)]
    write(root, "image;class\n" + "\n".join(rows) + "\n")  # semicolons, as some spreadsheets write
    src = open_label_file(root, "labels.csv")
    assert not src.multilabel and src.classes == ["cat", "dog", "fox"]
    assert sorted(src.splits["all"])[0] == ("cat/000.png", 0)


def test_indicator_columns_and_split_column(tmp_path):
    root = make_folder(tmp_path / "data", classes=("a",), n=8)
    lines = ["path,red,green,split"] + [f"a/{i:03d}.png,{i % 2},{int(i < 4)},{'test' if i >= 6 else 'train'}"
                                        for i in range(8)]
    write(root, "\n".join(lines) + "\n")
    src = open_label_file(root, "labels.csv")
    assert src.multilabel and src.classes == ["red", "green"]  # header order; a row of 0s is allowed
    assert len(src.splits["test"]) == 2 and len(src.splits["train"]) == 6
    assert src.splits["train"][1] == ("a/001.png", (1, 1))
    data = resolve(None, {"data.path": str(root), "data.labels": "labels.csv", "data.val_fraction": 0.2}).data
    splits = config_splits(src, data)
    assert {k for k, _ in splits["test"]} == {"a/006.png", "a/007.png"}


@pytest.mark.parametrize("text, message", [
    ("file,labels\nimg/000.png,red\nimg/999.png,blue\n", "bad.csv row 3: file img/999.png not found under"),
    ("file,labels\nimg/000.png,red\nimg/001.png,\n", "bad.csv row 3: no label for img/001.png"),
    ("file,labels\nimg/000.png,red||blue\n", "bad.csv row 2: empty label in 'red||blue'"),
    ("file,labels\nimg/000.png,red\nimg/000.png,blue\n", "row 3: file img/000.png is listed again (first in row 2)"),
    ("file,labels\n../x.png,red\n", "row 2: file ../x.png is not a path inside the data folder"),
    ("file,red,blue\nimg/000.png,1,maybe\n", "row 2: column blue: 'maybe' is not 0 or 1"),
    ("file,labels,split\nimg/000.png,red,train\nimg/001.png,blue,train\nimg/002.png,green,test\n",
     "row 4: label green appears in no training row"),
    ("file,labels,split\nimg/000.png,red,train\nimg/001.png,blue,later\n", "row 3: split 'later' is not one of"),
    ("name,labels\nimg/000.png,red\n", "no file column"),
    ("file,labels\nimg/000.png\n", "row 2: 1 column(s), the header has 2"),
    ("file,labels\nimg/000.png,red\nimg/001.png,red\n", "the data has one label (red)"),
])
def test_bad_label_files_are_one_line_naming_the_row(ml_folder, text, message):
    write(ml_folder, text, "bad.csv")
    with pytest.raises(DataError) as e:
        open_label_file(ml_folder, "bad.csv")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_label_file_and_not_a_folder(ml_folder, tmp_path, capsys):
    with pytest.raises(DataError, match="nope.csv: label file not found"):
        open_label_file(ml_folder, "nope.csv")
    args = ["train", "--data", str(ml_folder / "labels.csv"), "--labels", "labels.csv", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "--labels needs --data to be the folder" in capsys.readouterr().err


def test_fingerprint_follows_the_label_file(ml_folder):
    a = open_label_file(ml_folder, "labels.csv").fingerprint
    header, first, *rest = (ml_folder / "labels.csv").read_text().splitlines()
    first = first.split(",")[0] + ",blue|green|red|yellow"
    (ml_folder / "labels.csv").write_text("\n".join([header, first, *rest]) + "\n")
    assert open_label_file(ml_folder, "labels.csv").fingerprint != a


# ---------------------------------------------------------------- metrics

def test_thresholds_maximise_f1_and_metrics_are_consistent():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, 3, generator=g) > 0.6).long()
    logits = labels * 2.0 - 1 + torch.randn(200, 3, generator=g)
    t = choose_thresholds(logits, labels)
    assert len(t) == 3 and all(0 < x < 1 for x in t)
    m = multilabel_metrics(logits, labels, ["a", "b", "c"], t)
    assert m["map"] == pytest.approx(np.mean([r["ap"] for r in m["per_label"]]))
    default = multilabel_metrics(logits, labels, ["a", "b", "c"])  # at 0.5
    assert m["macro"]["f1"] >= default["macro"]["f1"] - 1e-9  # chosen on the same data: no worse
    empty = multilabel_metrics(logits, torch.zeros_like(labels), ["a", "b", "c"])
    assert empty["map"] is None and all(r["auc"] is None for r in empty["per_label"])


# ---------------------------------------------------------------- training

def test_multilabel_run_learns_and_records_thresholds(ml_folder, tmp_path):
    from graftnet.train.pipeline import train
    cfg = resolve(None, tiny_overrides(ml_folder, tmp_path, **{"data.labels": "labels.csv", "train.epochs": 12,
                                                                "train.lr": 1e-2, "train.early_stopping": 5}))
    result = train(cfg)
    m = json.loads((result.run_dir / "test_metrics.json").read_text())
    assert m["task"] == "multilabel" and m["map"] > 0.8  # chance: the labels' base rates, about 0.5
    assert m["map"] == pytest.approx(np.mean([r["ap"] for r in m["per_label"] if r["ap"] is not None]))
    for r in m["per_label"]:
        assert {"auc", "ap", "f1", "precision", "recall", "threshold", "support"} <= set(r)
    assert {"f1", "precision", "recall"} <= set(m["micro"]) and "f1" in m["macro"]
    model, spec = load_model(result.run_dir)
    assert spec.multilabel and len(spec.thresholds) == 4
    assert [r["threshold"] for r in m["per_label"]] == pytest.approx(spec.thresholds)
    assert all("val_map" in row for row in result.history)
    assert (result.run_dir / "per_label.png").is_file() and not (result.run_dir / "confusion.png").exists()
    html = (result.run_dir / "report.html").read_text()
    assert "Per-label metrics" in html and "mAP" in html
    assert "multi-label" in (result.run_dir / "MODEL_CARD.md").read_text()
    header = (result.run_dir / "test_predictions.csv").read_text().splitlines()[0]
    assert header.startswith("file,true,predicted,exact,p_blue")


def test_old_model_json_without_multilabel_loads(image_folder, tmp_path):
    from graftnet.train.pipeline import train
    result = train(resolve(None, tiny_overrides(image_folder, tmp_path, **{"train.epochs": 1})))
    raw = json.loads((result.run_dir / "model.json").read_text())
    for k in ("multilabel", "thresholds"):
        raw.pop(k)
    (result.run_dir / "model.json").write_text(json.dumps(raw))
    assert not load_model(result.run_dir)[1].multilabel


def test_multilabel_refuses_single_label_options(ml_folder, tmp_path, capsys):
    args = ["train", "--data", str(ml_folder), "--labels", "labels.csv", "--backbone", "test_efficientnet",
            "--no-pretrained", "--image-size", "32", "--epochs", "1", "--label-smoothing", "0.1",
            "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 2
    out = capsys.readouterr().err
    assert "train.label_smoothing: assumes one class per image" in out and "Traceback" not in out


# ---------------------------------------------------------------- commands on a multi-label run

@pytest.fixture(scope="module")
def ml_runs(tmp_path_factory):
    """Two tiny multi-label runs (different seeds) on one generated label file."""
    root = tmp_path_factory.mktemp("ml")
    data = make_multilabel_folder(root / "data", n=80)
    common = ["--data", str(data), "--labels", "labels.csv", "--backbone", "test_efficientnet", "--no-pretrained",
              "--image-size", "32", "--features", "multi", "--epochs", "8", "--batch-size", "8", "--lr", "0.01",
              "--hidden", "32", "--dropout", "0", "--out", str(root / "runs"), "--cache-dir", str(root / "cache"),
              "--set", "data.workers=1"]
    for seed in (0, 1):
        assert main(["train", *common, "--seed", str(seed), "--name", f"ml{seed}"]) == 0
    return {"root": root, "data": data, "runs": [root / "runs" / "ml0", root / "runs" / "ml1"], "common": common}


def test_predict_and_evaluate_a_multilabel_run(ml_runs, capsys):
    from graftnet.evaluation import predict
    run, data = ml_runs["runs"][0], ml_runs["data"]
    results = predict(run, data / "img", top=2)
    assert len(results) == 80 and set(results[0]) == {"file", "labels", "top"} and len(results[0]["top"]) == 2
    _, spec = load_model(run)
    for r in results:  # exactly the labels at or above their thresholds, most probable first
        probs = [e["probability"] for e in r["labels"]]
        assert probs == sorted(probs, reverse=True)
        assert all(e["probability"] >= spec.thresholds[spec.classes.index(e["class"])] - 1e-6 for e in r["labels"])
    truth = dict(line.split(",") for line in (data / "labels.csv").read_text().splitlines()[1:])
    hits = [set(e["class"] for e in r["labels"]) == set(truth[f"img/{r['file'].rsplit('/', 1)[1]}"].split("|"))
            for r in results]
    assert np.mean(hits) > 0.5  # every label of an image right at once, on most images
    capsys.readouterr()
    assert main(["predict", str(run), str(data / "img" / "000.png")]) == 0
    assert "labels" in capsys.readouterr().out
    assert main(["evaluate", str(run)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["map"] == pytest.approx(json.loads((run / "test_metrics.json").read_text())["map"])
    # another label file for the same images: its own evaluation folder
    (data / "again.csv").write_text((data / "labels.csv").read_text())
    assert main(["evaluate", str(run), "--data", str(data), "--labels", "again.csv"]) == 0
    assert (run / "evaluations" / "data-again" / "test_metrics.json").is_file()


def test_export_serve_and_ensemble_a_multilabel_run(ml_runs, tmp_path):
    from fastapi.testclient import TestClient

    from graftnet import serve
    from graftnet.export.exporter import export_run
    from graftnet.export.runtime import predict_onnx
    from graftnet.evaluation import predict
    run, data = ml_runs["runs"][0], ml_runs["data"]
    export_run(run)
    pre = json.loads((run / "export" / "preprocess.json").read_text())
    assert pre["multilabel"] and len(pre["thresholds"]) == 4
    onnx, torch_ = predict_onnx(run, data / "img"), predict(run, data / "img")
    chosen = lambda results: [{e["class"] for e in r["labels"]} for r in results]  # noqa: E731
    # ties within float rounding may swap two labels' order, never which labels are chosen (all but
    # a probability right at a threshold)
    assert np.mean([a == b for a, b in zip(chosen(onnx), chosen(torch_))]) > 0.95
    with TestClient(serve.create_app(run)) as client:
        answer = client.post("/predict", content=(data / "img" / "000.png").read_bytes(),
                             headers={"content-type": "image/png"}).json()
    assert set(answer) == {"labels", "top"}
    assert [e["class"] for e in answer["labels"]] == [e["class"] for e in torch_[0]["labels"]]
    assert main(["ensemble", *map(str, ml_runs["runs"]), "--out", str(tmp_path), "--name", "ens"]) == 0
    ens = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert ens["multilabel"] and len(ens["thresholds"]) == 4
    m = json.loads((tmp_path / "ens" / "test_metrics.json").read_text())
    assert m["task"] == "multilabel" and m["map"] > 0.7
    assert set(predict(tmp_path / "ens", data / "img" / "000.png")[0]) == {"file", "labels", "top"}
    assert main(["ensemble", *map(str, ml_runs["runs"]), "--weighted", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("argv, message", [
    (["prune", "{run}"], "a multi-label run; pruning"),
    (["quantize", "{run}"], "a multi-label run; int8"),
    (["extend", "{run}", "--data", "{data}"], "a multi-label run; extend"),
    (["distill", "--teacher", "{run}", "{common}", "--name", "d"], "a multi-label run; distillation"),
    (["lr-find", "{common}"], "multi-label data; lr-find"),
    (["continual", "--split", "2", "{common}"], "data.labels: continual tasks"),
    (["search", "--trials", "1", "{common}"], "multi-label data; the search"),
])
def test_single_label_commands_refuse_a_multilabel_run_in_one_line(ml_runs, argv, message, capsys, tmp_path):
    fill = {"{run}": [str(ml_runs["runs"][0])], "{data}": [str(ml_runs["data"])], "{common}": ml_runs["common"]}
    args = [x for a in argv for x in fill.get(a, [a])]
    if args[0] in ("lr-find",):
        args += ["--out", str(tmp_path / "lr.png")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_preview_titles_multilabel_images_with_their_labels(ml_folder, tmp_path):
    out = tmp_path / "p.png"
    assert main(["preview", "--data", str(ml_folder), "--labels", "labels.csv", "--out", str(out), "-n", "4"]) == 0
    assert out.is_file()
