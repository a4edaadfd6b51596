"""The report's predictions grid: the mistakes with the highest loss, then the surest right answers."""
import math

import torch
from PIL import Image

from graftnet.report import plots

CLASSES = ["cat", "dog", "fox"]


def logits_for(rows: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probabilities."""
    return torch.tensor([[math.log(p) for p in row] for row in rows])


# image: (probabilities, label)
CASES = [
    ([0.80, 0.15, 0.05], 0),   # 0 right, p 0.80
    ([0.10, 0.85, 0.05], 0),   # 1 wrong, p_true 0.10
    ([0.02, 0.97, 0.01], 2),   # 2 wrong, p_true 0.01: the highest loss
    ([0.60, 0.30, 0.10], 1),   # 3 wrong, p_true 0.30
    ([0.05, 0.05, 0.90], 2),   # 4 right, p 0.90
    ([0.34, 0.33, 0.33], 0),   # 5 right, p 0.34: the least sure
    ([0.45, 0.05, 0.50], 0),   # 6 wrong, p_true 0.45: the lowest loss of the mistakes
    ([0.01, 0.98, 0.01], 1),   # 7 right, p 0.98: the surest
    ([0.90, 0.05, 0.05], -1),  # 8 unlabeled: neither right nor wrong
]
LOGITS = logits_for([c[0] for c in CASES])
LABELS = torch.tensor([c[1] for c in CASES])


def test_grid_shows_highest_loss_mistakes_then_surest_right_answers():
    assert plots.grid_picks(LOGITS, LABELS, 32) == [2, 1, 3, 6, 7, 4, 0, 5]
    assert plots.grid_picks(LOGITS, LABELS, 3) == [2, 1, 3]
    assert plots.grid_picks(LOGITS, torch.full((9,), -1), 32) == []


def test_predictions_plot_says_right_and_wrong_in_words(tmp_path, monkeypatch):
    images = [torch.full((3, 8, 8), 25 * i, dtype=torch.uint8) for i in range(len(CASES))]
    out = plots.plot_predictions(images, LOGITS, LABELS, CLASSES, tmp_path / "predictions.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 200

    seen = {}
    monkeypatch.setattr(plots, "plot_samples", lambda imgs, titles, path, colors, suptitle: seen.update(
        titles=titles, colors=colors, suptitle=suptitle))
    plots.plot_predictions(images, LOGITS, LABELS, CLASSES, tmp_path / "p.png")
    assert seen["titles"][0] == "✗ wrong\npred: dog 0.97\ntrue: fox 0.01"
    assert seen["titles"][4] == "✓ right\ndog 0.98"
    assert [t.split("\n")[0] for t in seen["titles"]] == ["✗ wrong"] * 4 + ["✓ right"] * 4
    assert seen["suptitle"] == "all 4 mistakes, highest loss first; then the 4 right answers the model was surest of"
    plots.plot_predictions(images, LOGITS, LABELS, ["cat", "dog", "fox_in_the_snow_at_night"], tmp_path / "p.png")
    assert seen["titles"][0] == "✗ wrong\npred: dog 0.97\ntrue: fox_in_the_s… 0.01"  # the number stays
