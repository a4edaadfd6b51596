"""Augmentation presets: the paper's policy per image in one batched warp, repeatable by seed, and
the two ways to train with it on a frozen backbone (cached views, or every batch)."""
import pytest
import torch

from graftnet import config
from graftnet.data.augment import PRESETS, make_augment
from graftnet.data.images import ImageSet
from graftnet.errors import ConfigError
from graftnet.features import image_batches
from graftnet.train.pipeline import train

from .conftest import tiny_overrides


def _batch():
    torch.manual_seed(0)
    return torch.rand(6, 3, 32, 32)


def test_paper_policy_is_per_image_and_repeatable():
    x = _batch()
    aug = make_augment("paper")
    aug.reseed(1)
    a = aug.batch(x)
    aug.reseed(1)
    b = aug.batch(x)
    aug.reseed(2)
    c = aug.batch(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x, atol=1e-3)
    # each image gets its own transform: warping image 0 alone differs from its warp in the batch
    # unless parameters were shared; check two identical inputs come out different
    same = x[:1].repeat(4, 1, 1, 1)
    aug.reseed(3)
    out = aug.batch(same)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    # border filling (Keras fill_mode="nearest") keeps values inside the input range
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5


def test_flip_preset_flips_some_images_only():
    x = _batch()
    aug = make_augment("flip")
    aug.reseed(0)
    out = aug.batch(x)
    flipped = [torch.equal(o, xi.flip(2)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "none"])
def test_every_preset_keeps_shapes_and_dtypes(name):
    aug = make_augment(name)
    aug.reseed(0)
    imgs = [torch.randint(0, 255, (3, 24, 24), dtype=torch.uint8) for _ in range(3)]
    out = aug.images(imgs)
    assert [o.shape for o in out] == [i.shape for i in imgs] and out[0].dtype == torch.uint8
    assert aug.batch(_batch()).shape == (6, 3, 32, 32)


@pytest.mark.parametrize("name", ["paper", "randaugment"])
def test_an_epoch_resumed_part_way_draws_the_same_batches(name):
    """Each batch's augmentation is seeded from its index in the epoch, so the batches of an epoch
    resumed at batch 3 are the last batches of the whole epoch, whether the preset draws in the
    prefetch thread (paper) or from the global generator in order (randaugment)."""
    torch.manual_seed(0)
    images = ImageSet([torch.randint(0, 255, (3, 24, 24), dtype=torch.uint8) for _ in range(20)],
                      torch.arange(20) % 2, [str(i) for i in range(20)], ["a", "b"])
    order = torch.randperm(20)

    def epoch(start):
        out = image_batches(images, order[start * 4:], 4, 32, [0.5] * 3, [0.5] * 3, False,
                            augment=make_augment(name), augment_seed=7, first_batch=start)
        return [x for x, _ in out]
    whole, resumed = epoch(0), epoch(3)
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(whole[3:], resumed))
    other, _ = next(image_batches(images, order[12:], 4, 32, [0.5] * 3, [0.5] * 3, False,
                                  augment=make_augment(name), augment_seed=8, first_batch=3))
    assert not torch.equal(whole[3], other)  # the seed matters: augmentation did draw


def test_cached_views_train_from_k_views(image_folder, tmp_path):
    run = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        "train.augment": "paper", "train.cache_views": 2})))
    log = (run / "log.txt").read_text()
    assert "features train view 0" in log and "features train view 1" in log
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 4  # 2 views + val + test
    again = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        "train.augment": "paper", "train.cache_views": 2, "head.hidden": [16]})))
    assert (again / "log.txt").read_text().count("from cache") == 4


def test_on_the_fly_augmentation_runs_the_backbone_every_batch(image_folder, tmp_path):
    run = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        "train.augment": "flip", "train.epochs": 2})))
    assert "features train" not in (run / "log.txt").read_text()
    assert (run / "model.safetensors").is_file()


def test_augment_config_errors():
    with pytest.raises(ConfigError, match="cache_views"):
        config.resolve(None, {"train.cache_views": 3})
    with pytest.raises(ConfigError, match="pick one"):
        config.resolve(None, {"train.augment": "paper", "train.flip_views": True})
    with pytest.raises(ConfigError, match="train.augment"):
        config.resolve(None, {"train.augment": "cutout"})


def test_mixup_cutmix_train_on_the_fly_with_soft_targets(image_folder, tmp_path):
    run = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        "train.augment": "flip", "train.mixup": 0.2, "train.cutmix": 1.0, "train.epochs": 2})))
    import json
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["train_acc"] <= 1 for r in rows)
    with pytest.raises(ConfigError, match="mixup"):
        config.resolve(None, {"train.mixup": 0.2})  # cached features cannot be mixed as images
