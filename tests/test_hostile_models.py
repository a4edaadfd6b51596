"""Hostile model files: damaged checkpoints and weights, a hand-edited model.json, backbone weights
of the wrong shapes, and export / quantize stopped half-way. Every case ends in a working model or
in one GraftError naming the file; no temporary file outlives its command."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

from graftnet import backbones, config
from graftnet.backbones import fetched
from graftnet.cli import main
from graftnet.errors import BackboneError, GraftError
from graftnet.export import exporter, quantize
from graftnet.model import load_model
from graftnet.predictor import load_predictor
from graftnet.train.checkpoint import FILE as CHECKPOINT, checkpoint_epoch, load_checkpoint
from graftnet.train.optim import make_optimizer
from graftnet.train.pipeline import train

from .conftest import ROOT, TINY, make_folder, tiny_overrides

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run ("multi" features, head [32], avg pool), its checkpoint kept."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = make_folder(tmp / "data", splits={"train": 6, "test": 2})
    return Path(train(config.resolve(None, tiny_overrides(data, tmp, **{
        "train.epochs": 1, "backbone.precision": "fp32"}))))


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("export")))


@pytest.fixture(scope="module")
def onnx_model(trained, tmp_path_factory) -> Path:
    """The tiny run's model.onnx (exported once, outside the run folder the tests copy)."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    exporter.export_run(trained, out=out, n_check=2)
    return out


def with_onnx(run: Path, onnx_model: Path) -> Path:
    (run / "export").mkdir()
    return Path(shutil.copy(onnx_model, run / "export" / "model.onnx"))


def one_line(e: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path)), text
    for w in words:
        assert w in text, text
    return text


def edit_spec(run: Path, change) -> None:
    path = run / "model.json"
    spec = json.loads(path.read_text())
    out = change(spec)
    path.write_text(out if isinstance(out, str) else json.dumps(spec if out is None else out))


# ---------------------------------------------------------------- model.json edited by hand

SPEC_EDITS = {
    "hidden 999": (lambda s: s["head"].update(hidden=[999]), ["mlp.0.weight", "(999, ", "(32, "]),
    "one class more": (lambda s: s["classes"].append("emu"), ["mlp.2.weight", "(4, 32)", "(3, 32)"]),
    "one class less": (lambda s: s["classes"].pop() and None, ["mlp.2.weight", "(2, 32)", "(3, 32)"]),
    "unknown head key": (lambda s: s["head"].update(width=3), ["head.width", "unknown"]),
    "unknown key": (lambda s: s.update(colour="red"), ["colour", "unknown"]),
    "image_size -1": (lambda s: s.update(image_size=-1), ["image_size", "-1"]),
    "image_size text": (lambda s: s.update(image_size="big"), ["image_size", "'big'"]),
    "single features": (lambda s: s.update(features="last"), ["mlp.0.weight"]),
    "blocks features": (lambda s: s.update(features="blocks"), ["mlp.0.weight"]),
    "no such features": (lambda s: s.update(features="all"), ["features", "'all'"]),
    "a list": (lambda s: [1, 2], ["JSON object", "list"]),
    "invalid JSON": (lambda s: '{"backbone": ', ["not valid JSON"]),
    "no classes": (lambda s: s.pop("classes") and None, ["classes", "missing"]),
    "classes not text": (lambda s: s.update(classes=[1, 2, 3]), ["classes"]),
    "two means": (lambda s: s.update(mean=[0.5, 0.5]), ["mean"]),
    "zero std": (lambda s: s.update(std=[0, 1, 1]), ["std"]),
    "unknown backbone": (lambda s: s.update(backbone="no_such_net"), ["backbone", "no_such_net"]),
    "pruned not a mapping": (lambda s: s.update(pruned=[1]), ["pruned"]),
    "huge pruned tensor": (lambda s: s.update(pruned={"mlp.0": {"tensors": {"weight": [10**7, 10**7]}}}),
                           ["mlp.0.weight", "(10000000, 10000000)"]),
    "dropout 2": (lambda s: s["head"].update(dropout=2), ["head.dropout"]),
    # the gated head of `graft extend` (heads.GatedHead)
    "gate not a mapping": (lambda s: s.update(gate=[1]), ["gate", "JSON object"]),
    "gate of every class": (lambda s: s.update(gate={"old_classes": 3, "hidden": []}), ["gate", "old_classes 3"]),
    "gate unknown key": (lambda s: s.update(gate={"old_classes": 1, "hidden": [], "bias": 0}), ["gate", "'bias'"]),
    "gate on an MLP's weights": (lambda s: s.update(gate={"old_classes": 2, "hidden": []}),
                                 ["gate {'old_classes': 2", "mlp.scales", "lacks it"]),
}


@pytest.mark.parametrize("name", list(SPEC_EDITS))
def test_edited_model_json_is_one_clear_error(run, name):
    change, words = SPEC_EDITS[name]
    edit_spec(run, change)
    with pytest.raises(GraftError) as e:
        load_model(run)
    text = one_line(e, run / "model.json", *words)
    assert "model.safetensors" in text or not words[0].startswith("mlp.")


@pytest.mark.parametrize("cut", [1000, 0])
def test_damaged_model_safetensors_is_one_clear_error(run, cut):
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    with pytest.raises(GraftError) as e:
        load_model(run)
    one_line(e, weights, "damaged")


def test_a_reasonable_edit_still_loads(run):
    edit_spec(run, lambda s: s.update(image_size=48, classes=["a", "b", "c"]))
    model, spec = load_model(run)
    assert spec.classes == ["a", "b", "c"] and model(torch.zeros(1, 3, 48, 48)).shape == (1, 3)


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "quantize"])
def test_every_command_that_loads_a_run_says_so_in_one_line(run, command, capsys):
    edit_spec(run, lambda s: s["head"].update(hidden=[999]))
    data = config.resolve(run / "config.yaml").data.path
    image = next(Path(data).rglob("*.png"))
    argv = {"predict": ["predict", str(run), str(image)]}.get(command, [command, str(run)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(run / "model.json") in err and "Traceback" not in err and "mlp.0.weight" in err


def test_serve_loads_through_the_same_check(run):
    edit_spec(run, lambda s: s.update(image_size="big"))
    with pytest.raises(GraftError) as e:
        load_predictor(run)
    one_line(e, run / "model.json", "image_size")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def spec_mutations(draw, spec: dict):
    """model.json with keys dropped, values of any type, or replaced by any JSON document."""
    spec = copy.deepcopy(spec)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from([spec, spec["head"]])) if isinstance(spec.get("head"), dict) else spec
        key = draw(st.sampled_from(sorted(target) + ["extra"]))
        kind = draw(st.sampled_from(["drop", "value", "text", "small int", "whole"]))
        if kind == "drop":
            target.pop(key, None)
        elif kind == "value":
            target[key] = draw(json_values)
        elif kind == "text":  # harmless for weights_id, timm_name; a choice's name for others
            target[key] = draw(st.sampled_from(["relu", "gelu", "avg", "flatten", "last", "blocks"])
                               | st.text(max_size=8))
        elif kind == "small int":
            target[key] = draw(st.integers(-2, 300))
        else:
            spec = draw(json_values)
            break
    return spec


def test_fuzzed_model_json_loads_or_is_one_graft_error(trained, tmp_path):
    original = json.loads((trained / "model.json").read_text())
    outcomes = []

    @FUZZ
    @given(st.data())
    def check(data):
        spec = data.draw(spec_mutations(original))
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            d = Path(d)
            shutil.copy(trained / "model.safetensors", d)
            (d / "model.json").write_text(json.dumps(spec))
            outcomes.append(_loads(d))
    check()
    assert "GraftError" in outcomes and "loaded" in outcomes, outcomes


def _loads(run: Path) -> str:
    try:
        model, spec = load_model(run)
    except GraftError as e:
        assert "\n" not in str(e) and str(e).startswith(str(run)), str(e)
        return "GraftError"
    assert model(torch.zeros(1, 3, spec.image_size, spec.image_size)).shape == (1, len(spec.classes))
    return "loaded"


def damage(blob: bytes, data) -> bytes:
    """A random cut, byte flips (in the header, with its JSON, or in the tensors' data) or garbage."""
    kind = data.draw(st.sampled_from(["cut", "flip header", "flip data", "append", "garbage"]))
    if kind == "cut":
        return blob[:data.draw(st.integers(0, len(blob) - 1))]
    if kind == "append":
        return blob + data.draw(st.binary(min_size=1, max_size=64))
    if kind == "garbage":
        return data.draw(st.binary(max_size=256))
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    start, end = (0, header_end) if kind == "flip header" else (header_end, len(blob))
    out = bytearray(blob)
    for pos in data.draw(st.lists(st.integers(start, end - 1), min_size=1, max_size=6)):
        out[pos] ^= data.draw(st.integers(1, 255))
    return bytes(out)


def test_fuzzed_model_safetensors_loads_or_is_one_graft_error(trained, tmp_path):
    blob = (trained / "model.safetensors").read_bytes()
    outcomes = []

    @FUZZ
    @given(st.data())
    def check(data):
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            d = Path(d)
            shutil.copy(trained / "model.json", d)
            (d / "model.safetensors").write_bytes(damage(blob, data))
            outcomes.append(_loads(d))
    check()
    assert "GraftError" in outcomes, outcomes


# ---------------------------------------------------------------- checkpoints for --resume

def resumable(run: Path):
    """The model, optimizer and generator a resumed stage 1 builds, for load_checkpoint."""
    model, _ = load_model(run)
    for p in model.extractor.parameters():
        p.requires_grad_(False)
    optimizer = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                               "adam", 1e-3, 0.0)
    return model, optimizer, torch.Generator()


def _resumes(run: Path) -> str:
    rng = torch.get_rng_state()
    try:
        checkpoint_epoch(run)
        load_checkpoint(run, *resumable(run))
    except GraftError as e:
        assert "\n" not in str(e) and str(e).startswith(str(run / CHECKPOINT)), str(e)
        return "GraftError"
    finally:
        torch.set_rng_state(rng)
    return "loaded"


def rewrite_checkpoint(path: Path, meta) -> None:
    tensors = load_file(str(path))
    save_file(tensors, str(path), None if meta is None else {"graftnet": meta})


def edit_meta(path: Path, change) -> str:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["graftnet"])
    change(meta)
    return json.dumps(meta)


CHECKPOINT_DAMAGE = {
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
    "grown with zeros": lambda p: os.truncate(p, 1_000_000),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)),
    "no metadata": lambda p: rewrite_checkpoint(p, None),
    "metadata not JSON": lambda p: rewrite_checkpoint(p, "{epoch: 1"),
    "metadata a list": lambda p: rewrite_checkpoint(p, "[1, 2]"),
    "no epoch": lambda p: rewrite_checkpoint(p, json.dumps({"step": 1, "history": [], "param_groups": []})),
    "epoch text": lambda p: rewrite_checkpoint(p, json.dumps({"epoch": "one", "step": 1, "history": [],
                                                             "param_groups": []})),
    "lr text": lambda p: rewrite_checkpoint(p, edit_meta(p, lambda m: m["param_groups"][0].update(lr="fast"))),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_one_clear_error(run, name):
    path = run / CHECKPOINT
    CHECKPOINT_DAMAGE[name](path)
    steps = [lambda: load_checkpoint(run, *resumable(run))]
    if name != "lr text":  # the optimizer's settings are read by load_checkpoint alone
        steps.append(lambda: checkpoint_epoch(run))
    for step in steps:
        with pytest.raises(GraftError) as e:
            step()
        one_line(e, path, "damaged", "graft train --config")


def test_resume_from_a_damaged_checkpoint_says_so(run, capsys):
    os.truncate(run / CHECKPOINT, 1_000_000)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / CHECKPOINT) in err and "damaged" in err and "Traceback" not in err


def test_fuzzed_checkpoint_resumes_or_is_one_graft_error(trained, tmp_path):
    blob = (trained / CHECKPOINT).read_bytes()
    outcomes = []
    assert _resumes(trained) == "loaded"

    @FUZZ
    @given(st.data())
    def check(data):
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            d = Path(d)
            for name in ("model.json", "model.safetensors"):
                shutil.copy(trained / name, d)
            (d / CHECKPOINT).parent.mkdir()
            (d / CHECKPOINT).write_bytes(damage(blob, data))
            outcomes.append(_resumes(d))
    check()
    assert "GraftError" in outcomes, outcomes


# ---------------------------------------------------------------- backbone weights of the wrong shapes

def test_backbone_weights_with_wrong_shapes_name_the_tensor(tmp_path):
    spec = backbones.get_spec(TINY)
    state = spec.architecture().state_dict()
    name = list(state)[3]
    state[name] = torch.zeros(7, *state[name].shape[1:])
    path = tmp_path / "wrong_shapes.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(BackboneError) as e:
        backbones.create(spec, weights=str(path))
    one_line(e, path, name, "(7,)", f"{tuple(spec.architecture().state_dict()[name].shape)}")


VGG_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


@pytest.mark.parametrize("layer,channels,words", [
    (0, (4, 64), ["features.0.weight", "(64, 4, 3, 3)", "(64, 3, 3, 3)"]),
    (5, (256, 128), ["features.12.weight", "(128, 256, 3, 3)", "(256, 256, 3, 3)"])])
def test_keras_weights_with_wrong_shapes_name_the_tensor(tmp_path, monkeypatch, capsys, layer, channels, words):
    h5py = pytest.importorskip("h5py")
    monkeypatch.setenv("GRAFTNET_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "wrong_shapes.h5"
    with h5py.File(path, "w") as f:
        for i, (name, (cin, cout)) in enumerate(zip(fetched.KERAS_VGG16_LAYERS, VGG_CHANNELS)):
            cin, cout = channels if i == layer else (cin, cout)
            g = f.create_group(name)
            g.create_dataset(f"{name}/kernel:0", data=np.zeros((3, 3, cin, cout), np.float32))
            g.create_dataset(f"{name}/bias:0", data=np.zeros(cout, np.float32))
    assert main(["weights", "import", str(path), "--arch", "vgg16", "--out", str(tmp_path / "w.safetensors")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(path) in err and all(w in err for w in words), err


# ---------------------------------------------------------------- temporary files of export / quantize

def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failed_export_leaves_no_temporary_file(run, monkeypatch):
    def broken(model, x, path):
        Path(path).write_bytes(b"half a model")
        raise KeyboardInterrupt
    monkeypatch.setattr(exporter, "_export_onnx", broken)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_run(run)
    assert leftovers(run / "export") == []


def test_export_removes_stale_leftovers_of_killed_runs(run):
    folder = run / "export"
    folder.mkdir()
    stale, young = folder / ".model.onnx.k1ll3d_x.tmp", folder / ".model.onnx.wr1t1ng_.tmp"
    stale_dir, other = folder / ".model.int8.onnx.q4ant1ze.tmp", folder / "notes.tmp"
    stale_dir.mkdir()
    (stale_dir / "prepared.onnx").write_bytes(b"x")
    for p in (stale, young, other):
        p.write_bytes(b"")
    hour_ago = time.time() - 3600
    for p in (stale, stale_dir, other):
        os.utime(p, (hour_ago, hour_ago))
    os.utime(young, (time.time() + 60, time.time() + 60))  # written by a process younger than this one
    exporter.export_run(run, n_check=2)
    assert leftovers(folder) == sorted([young.name, other.name])


def test_failed_quantization_leaves_no_temporary_file(run, onnx_model, monkeypatch, tmp_path):
    from onnxruntime.quantization import shape_inference
    with_onnx(run, onnx_model)
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))

    def broken(src, dst, *a, **k):
        Path(dst).write_bytes(b"a prepared model")
        raise RuntimeError("stopped half-way")
    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    with pytest.raises(RuntimeError):
        quantize.quantize_onnx(run / "export" / "model.onnx", run / "export" / "model.int8.onnx", "dynamic")
    assert not list(system_tmp.rglob("prepared.onnx")) and leftovers(run / "export") == []


KILLED_QUANTIZE = """
import os, signal, sys
from pathlib import Path
from onnxruntime.quantization import shape_inference
from graftnet.export.quantize import quantize_onnx
def killed(src, dst, *a, **k):
    Path(dst).write_bytes(b"a prepared model")
    os.kill(os.getpid(), signal.SIGTERM)
shape_inference.quant_pre_process = killed
quantize_onnx(sys.argv[1], sys.argv[2], "dynamic")
"""


def test_terminated_quantization_removes_its_temporary_files(run, onnx_model, tmp_path):
    with_onnx(run, onnx_model)
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    done = subprocess.run([sys.executable, "-c", KILLED_QUANTIZE, str(run / "export" / "model.onnx"),
                           str(run / "export" / "model.int8.onnx")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(system_tmp), "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert not list(system_tmp.rglob("prepared.onnx")) and leftovers(run / "export") == []


KILLED_WRITE = """
import os, signal, sys
from graftnet.io import atomic_write
def killed(tmp):
    open(tmp, "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGTERM)
atomic_write(sys.argv[1], killed)
"""


def test_terminated_write_removes_its_temporary_file(tmp_path):
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path / "model.onnx")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert list(tmp_path.iterdir()) == []
