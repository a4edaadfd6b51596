"""The learning-rate range test: where it stops, and what it suggests.

On CIFAR-10 a head whose weights blew up sat at chance loss (ln 10 = 2.3), under four times the best
loss (about 0.8), so the test ran on to lr 10, and the steepest descent anywhere in the range was
the way down from a later spike: it suggested 1.7e-1 where the minimum was near 7e-3.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from graftnet.train.lr_find import STEPS, lr_range_test, suggest, valley

LRS = [1e-7 * (10 / 1e-7) ** (i / (STEPS - 1)) for i in range(STEPS)]


def spiky_curve() -> list[float]:
    """Flat at chance, a valley down to 0.8 (steps 90-130), back up to chance, then a spike at
    steps 150-160 whose way down is far steeper than the valley."""
    out = []
    for i in range(STEPS):
        if i < 90:
            loss = 2.3 + 0.005 * math.sin(i)
        elif i <= 130:
            loss = 2.3 - 1.5 * (i - 90) / 40
        elif i <= 140:
            loss = 0.8 + 1.5 * (i - 130) / 10
        elif 150 <= i < 153:
            loss = 8.0
        elif 153 <= i < 160:
            loss = 8.0 - 5.7 * (i - 152) / 7
        else:
            loss = 2.3
        out.append(loss)
    return out


def steepest_descent(lrs, losses) -> float:
    """The former rule: the steepest fall per log-rate anywhere but the ends."""
    lo, hi = len(lrs) // 10, len(lrs) - len(lrs) // 20
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(lo, hi - 1)]
    return lrs[lo + min(range(len(slopes)), key=slopes.__getitem__)]


def test_suggestion_is_in_the_valley_not_on_a_later_spike():
    losses = spiky_curve()
    assert LRS[150] <= steepest_descent(LRS, losses) <= LRS[160]  # the trap: the spike's way down
    assert valley(losses) == (93, 130)  # from where the fall begins in earnest to the minimum
    lr = suggest(LRS, losses)
    assert LRS[100] <= lr <= LRS[120]  # halfway down the valley, in log-rate


class CollapsingHead(torch.nn.Module):
    """Features are one-hot labels, so the logits are scripted: chance for 90 steps, a fall to the
    loss `low` by step 130, then from step 140 the loss `after`, as a ReLU head whose weights blew
    up gives (it predicts one class whatever the input)."""

    def __init__(self, classes: int, low: float, after: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.classes, self.low, self.after, self.step = classes, low, after, 0

    def forward(self, x):
        i, self.step = self.step, self.step + 1
        chance = math.log(self.classes)
        target = chance if i < 90 else chance + (self.low - chance) * min(1, (i - 90) / 40) if i < 140 \
            else self.after
        # cross-entropy of a margin m on the true class: log(1 + (C - 1) e^-m)
        margin = -math.log((math.exp(target) - 1) / (self.classes - 1))
        return x * margin + self.w * 0


@pytest.mark.parametrize("classes,low,after", [
    (10, 0.8, math.log(10)),        # CIFAR-10: back at chance, under 4x (and over 2x) the best
    (100, 3.0, math.log(100) + 0.3),  # chance is under 2x the best: back above the starting loss
])
def test_range_test_stops_when_the_loss_returns_to_chance(classes, low, after):
    y = torch.arange(20 * classes) % classes
    x = torch.nn.functional.one_hot(y, classes).float()
    g = torch.Generator().manual_seed(0)
    lrs, losses = lr_range_test(CollapsingHead(classes, low, after), x, y, "sgd", 32, g)
    assert 140 < len(lrs) < 160  # stopped as the running mean caught up, not at lr 10
    assert min(losses) < low + 0.2 and max(losses[130:]) <= max(2 * min(losses), losses[0])


def test_range_test_on_separable_features_stops_at_divergence():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g)
    y = torch.randint(10, (1000,), generator=g)
    x = centres[y] + 1.5 * torch.randn(1000, 32, generator=g)
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(64, 10))
    lrs, losses = lr_range_test(head, x, y, "adam", 32, g)
    low = min(range(len(losses)), key=losses.__getitem__)
    assert len(lrs) < STEPS and losses[low] < 0.5 * losses[0]  # it learned, then diverged
    assert max(losses[low:]) <= 2 * losses[low]  # nothing past divergence is recorded
    assert lrs[-1] < 10 * lrs[low]
    assert 1e-4 < suggest(lrs, losses) < lrs[low]


def test_lr_find_json_and_plot_mark_minimum_and_suggestion(image_folder, tmp_path, capsys):
    from graftnet.cli import main
    out = tmp_path / "lr.png"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backbone: {name: test_efficientnet, pretrained: false, image_size: 32, features: multi}\n"
                   f"cache_dir: {tmp_path / 'cache'}\n")
    assert main(["lr-find", "--config", str(cfg), "--data", str(image_folder), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["lrs"]) == len(result["losses"]) and isinstance(result["diverged"], bool)
    lo, hi = result["valley"]
    assert lo <= result["suggested_lr"] <= hi == result["min_loss_lr"]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert f"{result['suggested_lr']:.2e}" in capsys.readouterr().out
