"""The application recipes (X-ray, plants, flowers) and what they rely on: grayscale input,
class-balanced loss and sampling, two-class metrics with a validation-chosen threshold; and the
CIFAR-10 fine-tuning recipe against the command it was benchmarked with."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from graftnet import config
from graftnet.binary import choose_threshold, operating_point, positive_index, roc_auc, roc_curve
from graftnet.data.images import decode, load_images
from graftnet.data.sources import open_source
from graftnet.errors import ConfigError
from graftnet.evaluation import predict
from graftnet.train.balance import class_weights, epoch_order
from graftnet.train.loop import feature_batches
from graftnet.train.pipeline import load_data, train

from .conftest import ROOT, make_folder, tiny_overrides

RECIPES = ROOT / "recipes"
# recipe -> (classes of the generated data, a small input size the architecture accepts)
APPLICATIONS = {"xray-pneumonia-vgg16.yaml": (("NORMAL", "PNEUMONIA"), 32),
                "plants-resnet50.yaml": (("Apple___healthy", "Apple___scab", "Corn___rust"), 32),
                "flowers-inceptionv3.yaml": (("daisy", "roses", "tulips"), 75)}


def small_run(recipe: Path, data: Path, tmp_path: Path, size: int) -> dict:
    """The recipe as written, with only what a few generated images need changed: random weights of
    the recipe's own architecture, a small input, one epoch."""
    return {"data.path": str(data), "backbone.pretrained": False, "backbone.image_size": size,
            "train.epochs": 1, "train.batch_size": 8, "train.early_stopping": 0,
            "out": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "data.workers": 1}


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_recipe_documents_itself_and_runs_end_to_end(name, tmp_path):
    recipe = RECIPES / name
    text = recipe.read_text()
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    assert "graft train --config recipes/" + name in header      # the command to run
    assert "--backbone efficientnet_lite0" in header             # the offline fallback
    assert "http" in header and "Layout" in header                # where the data is, and its shape
    cfg = config.resolve(recipe)
    assert cfg.backbone.name == {"xray": "vgg16", "plan": "resnet50", "flow": "inception_v3"}[name[:4]]

    classes, size = APPLICATIONS[name]
    data = make_folder(tmp_path / "data", classes=classes, n=8 if len(classes) == 2 else 5)
    run = train(config.resolve(recipe, small_run(recipe, data, tmp_path, size)))
    spec = json.loads((run / "model.json").read_text())
    assert spec["backbone"] == cfg.backbone.name and spec["classes"] == list(classes)
    saved = config.load_yaml(run / "config.yaml")
    assert saved["head"] == json.loads(json.dumps(config.to_dict(cfg.head)))  # the recipe's head
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["n"] > 0 and (run / "report.html").is_file()
    # two classes: binary metrics, ROC curve and a report section; more classes: none of them
    binary = len(classes) == 2
    assert ("binary" in metrics) == binary
    assert (run / "roc.png").is_file() == binary
    assert ("Two-class metrics" in (run / "report.html").read_text()) == binary
    if binary:
        b = metrics["binary"]
        assert b["positive_class"] == "PNEUMONIA" and "value" in b["threshold"]
        assert 0 <= b["auc"] <= 1


def _colour_image(path: Path) -> Path:
    arr = np.zeros((20, 20, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200, 50, np.arange(20, dtype=np.uint8)[None, :] * 10
    Image.fromarray(arr).save(path)
    return path


def test_grayscale_gives_equal_channels_in_training_and_predict(tmp_path):
    img = _colour_image(tmp_path / "c.png")
    rgb, gray = decode(img.read_bytes(), str(img)), decode(img.read_bytes(), str(img), True)
    r, g, b = (np.asarray(gray, np.float64)[..., i] for i in range(3))
    assert not np.array_equal(np.asarray(rgb)[..., 0], np.asarray(rgb)[..., 1])
    assert np.array_equal(r, g) and np.array_equal(g, b)
    # the luminance of the colour image (ITU-R 601-2), not one of its channels
    expected = np.asarray(rgb, np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(r - expected).max() <= 1

    data = make_folder(tmp_path / "data", classes=("NORMAL", "PNEUMONIA"), n=6)
    cfg = config.resolve(None, tiny_overrides(data, tmp_path, **{"data.grayscale": True, "train.epochs": 1}))
    _, sets = load_data(cfg)
    for im in sets["train"].images:
        assert torch.equal(im[0], im[1]) and torch.equal(im[1], im[2])
    plain = load_images(open_source(str(data)), [(k, 0) for k in sets["train"].keys[:1]], 32)
    assert not torch.equal(plain.images[0][0], plain.images[0][1])  # the data itself is colourful

    run = train(cfg)
    assert config.resolve(run / "config.yaml").data.grayscale
    seen = []
    from graftnet.predictor import RunPredictor
    original = RunPredictor.logits

    def spy(self, images, *args, **kwargs):
        seen.extend(images.images)
        return original(self, images, *args, **kwargs)
    RunPredictor.logits = spy
    try:
        results = predict(run, img)
    finally:
        RunPredictor.logits = original
    assert len(results) == 1 and seen and all(torch.equal(x[0], x[2]) for x in seen)
    assert "at_threshold" in results[0]  # a two-class run decides at its validation threshold too


def test_balanced_class_weights_and_loss():
    labels = torch.tensor([0] * 9 + [1])
    w = class_weights(labels, 2, "balanced")
    assert torch.allclose(w, torch.tensor([10 / 18, 10 / 2]))  # n / (k * n_c)
    assert class_weights(labels, 2, "none") is None
    # each class then carries the same total weight, so a loss that is wrong only on the rare class
    # weighs as much as one wrong only on the common class
    logits = torch.zeros(10, 2)
    logits[:, 0] = 4.0                     # everything called class 0: the rare one is wrong
    plain = F.cross_entropy(logits, labels)
    weighted = F.cross_entropy(logits, labels, weight=w)
    assert weighted > 3 * plain


def test_balanced_sampler_draws_classes_evenly_on_both_paths():
    labels = torch.tensor([0] * 90 + [1] * 10)
    g = torch.Generator().manual_seed(0)
    plain = torch.cat([epoch_order(labels, g) for _ in range(20)])
    balanced = torch.cat([epoch_order(labels, g, "balanced") for _ in range(20)])
    assert sorted(plain[:100].tolist()) == list(range(100))      # a permutation: each once
    share = labels[balanced].float().mean().item()
    assert 0.45 < share < 0.55 and labels[plain].float().mean().item() == pytest.approx(0.1)
    # the cached-features path draws the same way
    x = torch.arange(100, dtype=torch.float32)[:, None]
    ys = torch.cat([y for _ in range(20) for _, y in feature_batches(x, labels, 16, g, "balanced")])
    assert len(ys) == 2000 and 0.45 < ys.float().mean().item() < 0.55


def test_balanced_sampler_on_the_images_path(tmp_path):
    # 9:1 data trained on images (no feature cache): the sampler still sees both classes evenly
    data = tmp_path / "data"
    make_folder(data, classes=("common", "rare"), n=2)
    make_folder(tmp_path / "more", classes=("common",), n=16, seed=1)
    for i, p in enumerate(sorted((tmp_path / "more" / "common").iterdir())):
        p.rename(data / "common" / f"x{i}.png")
    drawn = []
    from graftnet.train import pipeline
    original = pipeline.epoch_order

    def spy(labels, generator, mode="none"):
        order = original(labels, generator, mode)
        drawn.append(labels[order])
        return order
    pipeline.epoch_order = spy
    try:
        train(config.resolve(None, tiny_overrides(data, tmp_path, **{
            "train.cache_features": False, "train.sampler": "balanced", "train.epochs": 3,
            "data.val_fraction": 0.0, "data.test_fraction": 0.2})))
    finally:
        pipeline.epoch_order = original
    counts = torch.bincount(torch.cat(drawn), minlength=2)
    assert len(drawn) == 3 and counts[1] > 0.3 * counts.sum()    # the rare class is ~1/10 of the data


def test_auc_matches_hand_computation_with_ties():
    score = np.array([0.9, 0.8, 0.8, 0.6, 0.5, 0.3])
    positive = np.array([1, 1, 0, 1, 0, 0], bool)
    # pairs (pos, neg): 0.9 beats all 3; 0.8 ties 0.8 (1/2) and beats 2; 0.6 beats 0.5 and 0.3
    assert roc_auc(score, positive) == pytest.approx((3 + 2.5 + 2) / 9)
    assert roc_auc(np.ones(4), np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)
    assert roc_auc(score, np.ones(6, bool)) is None                  # undefined with one class
    fpr, tpr, thr = roc_curve(score, positive)
    assert thr.tolist() == [np.inf, 0.9, 0.8, 0.6, 0.5, 0.3]
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(score, positive))


def test_threshold_choice_on_a_constructed_example():
    score = np.array([0.95, 0.9, 0.7, 0.6, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05])
    positive = np.array([1, 1, 1, 0, 1, 0, 0, 1, 0, 0], bool)
    # J at >= 0.7: 3/5 - 0 = 0.6; at >= 0.4: 4/5 - 1/5 = 0.6 (tie: the higher cut wins);
    # at >= 0.2: 1 - 3/5 = 0.4. The threshold lies halfway to the next lower score (0.6).
    assert choose_threshold(score, positive, "youden") == pytest.approx(0.65)
    # sensitivity >= 0.8 first reached at 0.4 (next lower 0.35); 1.0 only at 0.2 (next 0.1)
    assert choose_threshold(score, positive, "sensitivity", 0.8) == pytest.approx(0.375)
    assert choose_threshold(score, positive, "sensitivity", 0.95) == pytest.approx(0.15)
    # the lowest score's cut: halfway to 0
    assert choose_threshold(np.array([0.8, 0.3]), np.array([0, 1], bool), "sensitivity", 1.0) == \
        pytest.approx(0.15)
    for rule, target in (("youden", 0), ("sensitivity", 0.8), ("sensitivity", 0.95)):
        t = choose_threshold(score, positive, rule, target)
        j = operating_point(score >= t, positive)
        assert j["sensitivity"] >= target and (rule != "youden" or
                                                j["sensitivity"] + j["specificity"] - 1 == pytest.approx(0.6))
    op = operating_point(score >= 0.4, positive)
    assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (4, 1, 4, 1)
    assert op["sensitivity"] == op["specificity"] == op["accuracy"] == 0.8


def test_positive_class_is_explicit_or_second_sorted_and_checked(tmp_path):
    assert positive_index(["NORMAL", "PNEUMONIA"], None) == 1
    assert positive_index(["NORMAL", "PNEUMONIA"], "NORMAL") == 0
    with pytest.raises(ConfigError, match="not a class"):
        positive_index(["NORMAL", "PNEUMONIA"], "pneumonia")
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), n=4)
    with pytest.raises(ConfigError, match="two-class"):  # before any training
        load_data(config.resolve(None, tiny_overrides(data, tmp_path, **{"eval.positive_class": "a"})))
    with pytest.raises(ConfigError, match="train.sampler"):
        config.resolve(None, {"train.sampler": "oversample"})
    with pytest.raises(ConfigError, match="eval.threshold"):
        config.resolve(None, {"eval.threshold": "f1"})


def test_finetune_recipe_is_the_command_it_was_measured_with():
    """recipes/finetune-cifar10.yaml resolves exactly like the command its header says produced the
    benchmark, so the file and the number in BENCHMARKS.md cannot drift apart."""
    from graftnet.cli import build_parser, train_overrides
    recipe = RECIPES / "finetune-cifar10.yaml"
    [line] = [ln for ln in recipe.read_text().splitlines()
              if ln.startswith("#   graft finetune --config recipes/paper-cifar10.yaml")]
    args = build_parser().parse_args(line.lstrip("# ").split()[1:])
    args.config = str(ROOT / args.config)
    measured = config.resolve(args.config, train_overrides(args))
    assert config.to_dict(config.resolve(recipe)) == config.to_dict(measured)
    assert measured.finetune.epochs == 8 and measured.finetune.augment == "randaugment"
