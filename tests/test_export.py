"""Export (ONNX, TorchScript), the ONNX Runtime predictor and int8 quantization, on a tiny run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from graftnet import config
from graftnet.cli import main
from graftnet.data.images import square_uint8, to_batch
from graftnet.data.pixels import decode, square_array
from graftnet.errors import GraftError
from graftnet.evaluation import predict
from graftnet.export import exporter, runtime
from graftnet.export.quantize import quantize_run
from graftnet.model import load_model
from graftnet.train.pipeline import load_data, train

from .conftest import ROOT, make_folder, make_image, tiny_overrides


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny run, exported once to ONNX (RUN/export/model.onnx)."""
    tmp = tmp_path_factory.mktemp("export")
    data = make_folder(tmp / "data", splits={"train": 16, "test": 8})
    # fp32: ONNX Runtime runs the model in fp32, and predictions are compared to 1e-4 below; with
    # "auto", a CPU with AVX512-BF16 or AMX would predict in bf16 on the PyTorch side
    run_dir = train(config.resolve(None, tiny_overrides(data, tmp, **{"backbone.precision": "fp32"})))
    exporter.export_run(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    """Images of several sizes and shapes: enlarged (24 px), shrunk (50x40 JPEG), grayscale."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(3)
    for i in range(6):
        make_image(i % 3, rng).save(folder / f"small{i}.png")
        make_image(i % 3, rng, size=50).crop((0, 5, 50, 45)).save(folder / f"big{i}.jpg", quality=90)
    make_image(1, rng, size=40).convert("L").save(folder / "gray.png")
    return folder


def test_export_onnx_matches_torch_with_dynamic_batch(run):
    onnx_file = run / "export" / "model.onnx"
    assert onnx_file.is_file()
    model, spec = load_model(run)
    sess = runtime.session(onnx_file)
    for n in (1, 5):  # traced with 2: other batch sizes must run too
        x = torch.randn(n, 3, spec.image_size, spec.image_size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == (n, len(spec.classes))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_preprocess_json_holds_everything_to_run_the_model(run):
    pre = json.loads((run / "export" / "preprocess.json").read_text())
    _, spec = load_model(run)
    assert pre["classes"] == spec.classes == ["cat", "dog", "fox"]
    assert pre["image_size"] == 32 and pre["mean"] == spec.mean and pre["std"] == spec.std
    assert pre["input_layout"] == "NCHW" and pre["input_name"] == "input" and pre["color"] == "RGB"
    assert pre["flip_average"] is False


def test_runtime_imports_no_torch():
    code = "import sys, graftnet.export.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "False"


def test_numpy_preprocessing_matches_training(mixed_images):
    pre = {"image_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    paths = sorted(mixed_images.iterdir())
    torch_images = [square_uint8(decode(p.read_bytes(), str(p)), 32) for p in paths]
    np_images = [square_array(decode(p.read_bytes(), str(p)), 32) for p in paths]
    assert {im.shape[-1] for im in np_images} == {24, 32}  # both the enlarge and the shrink path
    for t, a in zip(torch_images, np_images):
        assert np.array_equal(t.numpy(), a)
    expected = to_batch(torch_images, 32, pre["mean"], pre["std"]).numpy()
    np.testing.assert_allclose(runtime.to_input(np_images, pre), expected, atol=1e-4)


def test_onnx_predict_matches_torch_predict(run, mixed_images, capsys):
    torch_results = predict(run, mixed_images, top=3)
    onnx_results = runtime.predict_onnx(run / "export" / "model.onnx", mixed_images, top=3)
    assert [r["file"] for r in onnx_results] == [r["file"] for r in torch_results]
    for t, o in zip(torch_results, onnx_results):
        assert o["class"] == t["class"]
        assert [c["class"] for c in o["top"]] == [c["class"] for c in t["top"]]
        np.testing.assert_allclose([c["probability"] for c in o["top"]],
                                   [c["probability"] for c in t["top"]], atol=1e-4)
    # the CLI: an .onnx file, or a run folder with --onnx, goes through ONNX Runtime
    for argv in ([str(run / "export" / "model.onnx")], [str(run), "--onnx"]):
        assert main(["predict", *argv, str(mixed_images), "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
        assert [r["class"] for r in cli] == [r["class"] for r in torch_results]


def test_evaluate_onnx_and_latency(run):
    cfg = config.resolve(run / "config.yaml")
    _, sets = load_data(cfg)
    model, spec = load_model(run)
    with torch.no_grad():
        torch_preds = model(to_batch(sets["test"].images, 32, spec.mean, spec.std)).argmax(1)
    result = runtime.evaluate_onnx(run / "export" / "model.onnx", sets["test"])
    assert result["n"] == len(sets["test"]) == 24
    assert result["predictions"] == torch_preds.tolist()
    assert result["accuracy"] == pytest.approx((torch_preds == sets["test"].labels).float().mean().item())
    lat = runtime.measure_latency(run / "export" / "model.onnx", batch_size=4, repeats=5, warmup=1)
    assert lat["batch_size"] == 4 and 0 < lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"]


def test_quantize_static_and_dynamic(run):
    cfg = config.resolve(run / "config.yaml")
    _, sets = load_data(cfg)
    fp32 = run / "export" / "model.onnx"
    result = quantize_run(run, "static", calibration=24)
    int8 = run / "export" / "model.int8.onnx"
    assert result["path"] == str(int8) and result["calibration_images"] == 24
    assert int8.stat().st_size < fp32.stat().st_size
    import onnx
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Gemm" in ops  # the head stays fp32
    a = runtime.evaluate_onnx(fp32, sets["test"])["predictions"]
    b = runtime.evaluate_onnx(int8, sets["test"])["predictions"]
    assert np.mean(np.equal(a, b)) >= 0.8

    dyn = run / "export" / "model.dyn.onnx"
    quantize_run(run, "dynamic", out=dyn)
    ops = {n.op_type for n in onnx.load(str(dyn)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    assert "Conv" in ops  # the backbone stays fp32
    c = runtime.evaluate_onnx(dyn, sets["test"])["predictions"]
    assert np.mean(np.equal(a, c)) >= 0.9


def test_quantize_reports_test_accuracy_beside_fp32(run, tmp_path, capsys, monkeypatch):
    """Agreement alone hides the cost: both models are scored on the run's whole test split, and a
    drop of more than a point gets one warning line."""
    from graftnet.export import quantize
    _, sets = load_data(config.resolve(run / "config.yaml"))
    out = tmp_path / "q" / "model.int8.onnx"
    result = quantize_run(run, "dynamic", out=out)
    assert result["test_images"] == result["agreement_images"] == len(sets["test"])
    fp32, int8 = (runtime.evaluate_onnx(p, sets["test"]) for p in (run / "export" / "model.onnx", out))
    assert result["test_accuracy_fp32"] == pytest.approx(fp32["accuracy"])
    assert result["test_accuracy_int8"] == pytest.approx(int8["accuracy"])
    assert result["agreement"] == pytest.approx(np.mean(np.equal(fp32["predictions"], int8["predictions"])))
    err = capsys.readouterr().err
    assert f"test accuracy int8 {int8['accuracy']:.4f} vs fp32 {fp32['accuracy']:.4f}" in err

    # an int8 model that names the next class wherever fp32 is right
    real = quantize.predictions

    def worse(path, images):
        p = real(path, images)
        return p if path.name == "model.onnx" else np.where(p == images.labels.numpy(), (p + 1) % 3, p)
    monkeypatch.setattr(quantize, "predictions", worse)
    result = quantize_run(run, "dynamic", out=out)
    assert result["test_accuracy_int8"] == 0 < result["test_accuracy_fp32"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "int8 loses" in warnings[0] and "points of test accuracy" in warnings[0]
    assert ("warning:" in err) == (fp32["accuracy"] - int8["accuracy"] > 0.01)


def test_torchscript_export(run, tmp_path):
    out = tmp_path / "ts" / "model.pt"
    result = exporter.export_run(run, "torchscript", out)
    assert out.is_file() and (out.parent / "preprocess.json").is_file()
    assert result["max_abs_diff"] < 1e-4


def test_export_that_does_not_match_is_refused(run, tmp_path, monkeypatch):
    class Wrong:
        def __init__(self, path):
            self.inner = runtime.session(path)

        def run(self, names, feed):
            return [self.inner.run(names, feed)[0] + 1.0]
    exported = (run / "export" / "model.onnx").read_bytes()  # exporting again would be slow

    def export(model, x, path):
        open(path, "wb").write(exported)
        return "copy"
    monkeypatch.setattr(exporter, "_export_onnx", export)
    monkeypatch.setattr(exporter, "session", Wrong)
    out = tmp_path / "bad" / "model.onnx"
    with pytest.raises(GraftError, match="differ from PyTorch"):
        exporter.export_run(run, "onnx", out)
    assert not out.exists()


def test_clear_errors(run, tmp_path, capsys):
    with pytest.raises(GraftError, match="no such run folder"):
        exporter.export_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftError, match="not a graftnet run folder"):
        exporter.export_run(tmp_path / "empty")
    with pytest.raises(GraftError, match="unknown export format 'tflite'"):
        exporter.export_run(run, "tflite")
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "not a graftnet run folder" in capsys.readouterr().err
    with pytest.raises(GraftError, match="unknown quantization method"):
        quantize_run(run, "fp8")
    # --onnx on a run that was never exported; an .onnx without its preprocess.json
    (tmp_path / "unexported").mkdir()
    with pytest.raises(GraftError, match="graft export"):
        runtime.predict_onnx(tmp_path / "unexported", tmp_path)
    lonely = tmp_path / "lonely" / "model.onnx"
    lonely.parent.mkdir()
    lonely.write_bytes((run / "export" / "model.onnx").read_bytes())
    with pytest.raises(GraftError, match="preprocess.json"):
        runtime.predict_onnx(lonely, tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    (tmp_path / "preprocess.json").write_text((run / "export" / "preprocess.json").read_text())
    with pytest.raises(GraftError, match="junk.onnx: ONNX Runtime cannot load it"):
        runtime.predict_onnx(tmp_path / "junk.onnx", tmp_path / "x.png")


def test_a_cut_backbone_trains_saves_and_exports_smaller(tmp_path):
    """backbone.cut drops the last stages: the run's model is smaller, reloads from its folder as
    saved, and its ONNX export gives PyTorch's logits."""
    data = make_folder(tmp_path / "data", splits={"train": 12, "test": 6})
    full = train(config.resolve(None, tiny_overrides(data, tmp_path, **{"backbone.precision": "fp32", "name": "full"})))
    cut = train(config.resolve(None, tiny_overrides(data, tmp_path, **{"backbone.precision": "fp32", "name": "cut",
                                                                     "backbone.cut": 2})))
    (m_full, _), (m_cut, spec) = load_model(full), load_model(cut)
    assert spec.cut == 2
    count = lambda m: sum(p.numel() for p in m.extractor.parameters())
    assert count(m_cut) < count(m_full)
    result = exporter.export_run(cut)
    x = torch.randn(3, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        expected = m_cut(x).numpy()
    got = runtime.session(result["path"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_a_cut_beyond_the_backbone_is_one_line(tmp_path, capsys):
    from graftnet.cli import main
    data = make_folder(tmp_path / "data", n=4)
    code = main(["train", "--data", str(data), "--backbone", "test_efficientnet", "--no-pretrained",
                 "--cut", "9", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and "backbone.cut 9" in errors[0] and "Traceback" not in err
    assert not any((tmp_path / "runs").iterdir())   # nothing half-made is left


def test_merged_onnx_ensemble_averages_its_members_probabilities(run, tmp_path):
    """merge_onnx: one file whose logits are log(sum w_i softmax(member_i)), on an fp32 member, a
    perturbed copy and the int8 model; members that do not share one input are refused by name."""
    import onnx
    from onnx import numpy_helper
    from graftnet.export.merge import merge_onnx
    fp32 = run / "export" / "model.onnx"
    other = onnx.load(str(fp32))
    biggest = max(other.graph.initializer, key=lambda t: len(t.raw_data))
    rng = np.random.default_rng(0)
    values = numpy_helper.to_array(biggest)
    biggest.CopyFrom(numpy_helper.from_array(values * rng.uniform(0.5, 1.5, values.shape).astype(values.dtype),
                                             biggest.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(other, str(perturbed))
    int8 = tmp_path / "model.int8.onnx"
    quantize_run(run, "static", calibration=16, out=int8)
    side = other.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    x = np.random.default_rng(1).standard_normal((5, 3, side, side)).astype(np.float32)
    outs = [runtime.session(p).run(["logits"], {"input": x})[0] for p in (fp32, perturbed, int8)]
    assert not np.allclose(outs[0], outs[1], atol=1e-3)
    probs = [np.exp(o - o.max(1, keepdims=True)) / np.exp(o - o.max(1, keepdims=True)).sum(1, keepdims=True)
             for o in outs]
    for members, weights in (((fp32, perturbed), None), ((fp32, perturbed, int8), [0.5, 0.3, 0.2])):
        merged = merge_onnx(members, tmp_path / f"ens{len(members)}.onnx", weights)
        got = runtime.session(merged).run(["logits"], {"input": x})[0]
        w = weights or [1 / len(members)] * len(members)
        expected = np.log(sum(wi * p for wi, p in zip(w, probs)))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert np.allclose(np.exp(got).sum(1), 1.0, atol=1e-5)
    wrong = onnx.load(str(fp32))
    wrong.graph.input[0].type.tensor_type.shape.dim[2].dim_value = side + 8
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    with pytest.raises(GraftError, match="wrong.onnx: input shape"):
        merge_onnx([fp32, tmp_path / "wrong.onnx"], tmp_path / "bad.onnx")
    with pytest.raises(GraftError, match="summing to 1"):
        merge_onnx([fp32, perturbed], tmp_path / "bad.onnx", [0.5, 0.6])
    assert not (tmp_path / "bad.onnx").exists()
