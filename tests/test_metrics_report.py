"""Metrics on hand-computed examples, and the report outputs (PNG files, self-contained HTML)."""
import json
import math

import pytest
import torch
from PIL import Image

from graftnet.metrics import classification_metrics, confusion_table, metrics_table, wilson_interval
from graftnet.report.html import write_report
from graftnet.report.plots import plot_confusion, plot_curves, plot_samples, stage_marks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _logits(rows: list[tuple[int, int]], n_classes: int) -> torch.Tensor:
    """One row per sample: (predicted class, runner-up class) get the two highest scores."""
    out = torch.zeros(len(rows), n_classes)
    for i, (first, second) in enumerate(rows):
        out[i, first], out[i, second] = 3.0, 2.0
    return out


def test_metrics_hand_computed():
    # true:      0  0  0  1  1  2
    # predicted: 0  0  1  1  2  2  -> confusion [[2,1,0],[0,1,1],[0,0,1]]
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = _logits([(0, 1), (0, 2), (1, 0), (1, 0), (2, 0), (2, 1)], 3)
    m = classification_metrics(logits, labels, ["a", "b", "c"], topk=(1, 2, 5))

    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["accuracy_ci95"] == pytest.approx([0.3000, 0.9032], abs=1e-4)  # Wilson, 4 of 6
    # top5 is dropped (only 3 classes); sample 4 (true 1) has runner-up 0, so top2 misses once.
    assert m["top_k"] == pytest.approx({"top1": 4 / 6, "top2": 5 / 6})

    per = {row["class"]: row for row in m["per_class"]}
    assert [per[c]["precision"] for c in "abc"] == pytest.approx([1.0, 0.5, 0.5])
    assert [per[c]["recall"] for c in "abc"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [per[c]["f1"] for c in "abc"] == pytest.approx([0.8, 0.5, 2 / 3])
    assert [per[c]["support"] for c in "abc"] == [3, 2, 1]
    assert m["macro"]["precision"] == pytest.approx(2 / 3)
    assert m["macro"]["recall"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert m["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)

    expected_loss = -torch.log_softmax(logits, dim=1)[torch.arange(6), labels].mean()
    assert m["loss"] == pytest.approx(float(expected_loss))
    json.dumps(m, allow_nan=False)  # must be plain JSON


def test_wilson_interval_textbook_values():
    # Wilson score intervals worked by hand: 50 of 100, 0 of 10, 10 of 10 correct
    assert wilson_interval(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    lo, hi = wilson_interval(9337, 10_000)  # a CIFAR-10 test set: about +-0.5 points
    assert 0.0045 < 0.9337 - lo < 0.0055 and 0.0040 < hi - 0.9337 < 0.0050


def test_metrics_zero_division_gives_zero():
    # Class "c" is neither present nor predicted; class "b" is present but never predicted.
    labels = torch.tensor([0, 1])
    logits = _logits([(0, 1), (0, 1)], 3)
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    per = {row["class"]: row for row in m["per_class"]}
    assert per["b"] == {"class": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per["c"]["precision"] == per["c"]["recall"] == per["c"]["f1"] == 0.0
    assert list(m["top_k"]) == ["top1"]  # top5 is meaningless with 3 classes
    json.dumps(m, allow_nan=False)


def test_rich_tables_render():
    from rich.console import Console
    classes = ["[red]", "a_very_long_class_name"]
    m = classification_metrics(_logits([(0, 1), (1, 0)], 2), torch.tensor([0, 1]), classes)
    console = Console(width=200, record=True)
    console.print(metrics_table(m, classes), confusion_table(m, classes))
    text = console.export_text()
    assert "[red]" in text  # escaped, not swallowed as markup
    assert "macro" in text and "a_very_…" in text


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        assert im.width > 0 and im.height > 0


def test_plots_write_png(tmp_path):
    nan = math.nan
    plot_curves([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": nan, "val_acc": nan}],
                tmp_path / "curves1.png")
    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 1 / (e + 1),
                "val_loss": 1.1 / e, "val_acc": 1 - 1.2 / (e + 1)} for e in range(1, 5)]
    plot_curves(history, tmp_path / "curves.png")
    for row, stage in zip(history, (None, "fine-tuning", "fine-tuning", "pruned")):
        row["stage"] = stage
    assert stage_marks(history) == [(1.5, "fine-tuning"), (3.5, "pruned")]
    plot_curves(history, tmp_path / "curves-stages.png")
    plot_confusion([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "cm2.png")
    plot_confusion(torch.eye(25, dtype=torch.long).tolist(), [f"c{i}" for i in range(25)],
                   tmp_path / "cm25.png", normalize=False)
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8),
              torch.randint(0, 256, (3, 40, 24), dtype=torch.uint8)]
    plot_samples(images, ["ok", "wrong"], tmp_path / "samples.png", colors=["green", "red"])

    for name in ("curves1", "curves", "curves-stages", "cm2", "cm25", "samples"):
        _assert_png(tmp_path / f"{name}.png")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_report_html(tmp_path):
    classes = ["<script>", "b&b"]
    test = classification_metrics(_logits([(0, 1), (1, 0)], 2), torch.tensor([0, 1]), classes)
    plot_confusion(test["confusion"], classes, tmp_path / "cm.png")
    out = write_report(tmp_path / "report.html", "Run <1>", {"test accuracy": "1.0000"},
                       {"backbone": "efficientnet_lite0", "lr": 0.001},
                       [{"epoch": 1, "train_loss": 0.5, "train_acc": 0.9, "val_loss": math.nan,
                         "val_acc": math.nan}],
                       test, {"Confusion matrix": tmp_path / "cm.png",
                              "Gone plot": tmp_path / "missing.png"},
                       classes, environment={"torch": torch.__version__})
    html = out.read_text()
    assert "data:image/png;base64,iVBORw0KGgo" in html  # base64 of the PNG signature
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "b&amp;b" in html and "Run &lt;1&gt;" in html
    assert "Gone plot" not in html  # missing image skipped, not a broken link
    assert "backbone: efficientnet_lite0" in html
    assert "accuracy 1.0000 (95% CI 0.3424–1.0000)" in html  # Wilson interval, 2 of 2
    assert "://" not in html  # self-contained: no external resources


def test_report_without_test_metrics(tmp_path):
    out = write_report(tmp_path / "r.html", "t", {}, {}, [], None, {}, ["a"])
    assert "Test metrics" not in out.read_text()
