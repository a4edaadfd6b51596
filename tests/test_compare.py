"""`graft compare`: paired counts and McNemar's exact test on files the evaluation writes."""
import json
from pathlib import Path

import pytest
import torch

from graftnet.cli import main
from graftnet.compare import compare, label, mcnemar_exact
from graftnet.errors import GraftError
from graftnet.evaluation import write_predictions

CLASSES = ["cat", "dog", "fox"]


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)            # 2 * P(X <= 0), X ~ Bin(6, 1/2)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)     # 2 * (1 + 10) / 2^10
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert 0 < mcnemar_exact(2000, 2200) < 0.01                      # big counts: exact integers, no overflow


def _write(folder: Path, keys, labels, preds) -> Path:
    logits = torch.full((len(keys), len(CLASSES)), -2.0)
    logits[torch.arange(len(keys)), torch.tensor(preds)] = 2.0
    folder.mkdir(parents=True)
    write_predictions(folder, "", logits, torch.tensor(labels), keys, CLASSES)
    return folder


def test_compare_counts_the_images_each_model_alone_gets_right(tmp_path, capsys):
    keys = [f"test/{CLASSES[i % 3]}/{i:03d}, copy.jpg" for i in range(40)]  # a comma: CSV quoting
    labels = [i % 3 for i in range(40)]
    wrong = lambda y: (y + 1) % 3  # noqa: E731
    # A: right on 0-29; B: right on 0-19 and 30-39 -> both 20, only A 10, only B 10, both wrong 0
    a = _write(tmp_path / "a", keys, labels, [y if i < 30 else wrong(y) for i, y in enumerate(labels)])
    b = _write(tmp_path / "b", keys, labels, [y if i < 20 or i >= 30 else wrong(y) for i, y in enumerate(labels)])
    r = compare(a, b / "test_predictions.csv")
    assert (r["n"], r["both_right"], r["only_a_right"], r["only_b_right"], r["both_wrong"]) == (40, 20, 10, 10, 0)
    assert r["accuracy_a"] == r["accuracy_b"] == 0.75 and r["difference"] == 0 and r["mcnemar_p"] == 1.0
    # C: right everywhere -> 10 more than A, all discordant pairs on C's side
    c = _write(tmp_path / "c", keys[::-1], labels[::-1], labels[::-1])  # row order does not matter
    r = compare(a, c)
    assert (r["only_a_right"], r["only_b_right"], r["difference"]) == (0, 10, 0.25)
    assert r["mcnemar_p"] == pytest.approx(2 / 1024)
    lo, hi = r["difference_ci95"]
    assert 0 < lo < 0.25 < hi
    assert main(["compare", str(a), str(c), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["only_b_right"] == 10
    assert main(["compare", str(a), str(c)]) == 0
    out = capsys.readouterr().out
    assert "+25.00 points" in out and "a real difference" in out
    assert label(Path("runs/r/evaluations/x-tta/test_predictions.csv")) == "r: x-tta"
    assert label(Path("runs/r")) == label(Path("runs/r/test_predictions.csv")) == "r"


def test_compare_refuses_different_images_or_labels(tmp_path):
    keys = [f"img{i}.png" for i in range(6)]
    a = _write(tmp_path / "a", keys, [0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2])
    b = _write(tmp_path / "b", keys[:5] + ["other.png"], [0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2])
    with pytest.raises(GraftError, match=r"different images \(1 only in the first, e.g. \['img5.png'\]"):
        compare(a, b)
    c = _write(tmp_path / "c", keys, [0, 1, 2, 0, 1, 1], [0, 1, 2, 0, 1, 2])
    with pytest.raises(GraftError, match="true class of 1 images, e.g. img5.png: fox against dog"):
        compare(a, c)
    with pytest.raises(GraftError, match="not found"):
        compare(a, tmp_path / "nowhere")
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(GraftError, match="bad.csv: not a graftnet predictions file"):
        compare(a, tmp_path / "bad.csv")
