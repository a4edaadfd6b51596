"""Accuracy-controlled int8 (export/control.py) on a tiny run: the escalation order, fp32 layers that
really are fp32 in the graph, the refusal that keeps fp32, the CPU's weight format, the record."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graftnet import config
from graftnet.cli import main
from graftnet.errors import GraftError
from graftnet.export import control, exporter
from graftnet.compress.qat import qat_step
from graftnet.export.control import REJECTED, ControlSettings, quantize_checked
from graftnet.export.quantize import cpu_flags, weight_reduce_range
from graftnet.train.pipeline import train

from .conftest import make_folder, tiny_overrides

FP32_VAL = 0.9


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    data = make_folder(tmp / "data", splits={"train": 16, "test": 8})
    run_dir = train(config.resolve(None, tiny_overrides(data, tmp, **{"train.epochs": 2})))
    exporter.export_run(run_dir)
    return Path(run_dir)


class Scripted:
    """A validation split whose int8 accuracies follow a script (fp32: FP32_VAL), so that which
    attempt meets the drop does not hang on a tiny model's rounding."""

    def __init__(self, int8: list[float]):
        self.int8, self.labels, self.seen = list(int8), np.zeros(10), []

    def accuracy(self, path) -> float:
        if path.name == "model.onnx":
            return FP32_VAL
        self.seen.append(path)
        return self.int8.pop(0) if len(self.int8) > 1 else self.int8[0]


def reads_dequantized(int8_path, names: list[str]) -> dict[str, bool]:
    """node -> whether any of its inputs comes out of a DequantizeLinear (it runs in int8)."""
    graph = onnx.load(str(int8_path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    return {n.name: any(producer.get(i) == "DequantizeLinear" for i in n.input)
            for n in graph.node if n.name in names}


def test_weight_format_follows_the_cpus_int8_instructions(tmp_path):
    assert weight_reduce_range({"avx2", "fma", "sse4_2"}) is True       # vpmaddubsw saturates: 7-bit
    assert weight_reduce_range(set()) is True
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert weight_reduce_range({"avx2", flag}) is False             # int32 sums: full 8-bit
    assert weight_reduce_range({"avx512f", "avx512bw"}) is True         # AVX-512 without VNNI
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "none") == set()


def test_stops_at_the_first_attempt_that_meets(run):
    result = quantize_checked(run, ControlSettings(max_drop=1.0, calibration=16, min_speedup=0),
                              validation=Scripted([FP32_VAL - 0.005]))
    assert result["accepted"] and len(result["attempts"]) == 1
    assert result["attempts"][0]["calibrate_method"] == "minmax" and result["fp32_layers"] == []
    int8 = run / "export" / "model.int8.onnx"
    assert result["path"] == str(int8) and int8.is_file() and not (run / "export" / REJECTED).exists()
    assert result["reduce_range"] is weight_reduce_range()
    saved = json.loads((run / "export" / "quantize.json").read_text())
    assert saved["attempts"] == result["attempts"] and saved["val"]["drop"] == pytest.approx(0.5)
    assert saved["test"]["images"] == 24 and 0 <= saved["test"]["int8"] <= 1
    assert {"b1_ms", "b64_ms"} <= set(saved["latency"]["int8"]) and saved["latency"]["speedup_b1"] > 0
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["int8"]["test_int8"] == saved["test"]["int8"] and metrics["int8"]["accepted"]
    assert "accuracy" in metrics  # fp32's numbers stay beside it
    report = (run / "report.html").read_text()
    assert report.count("int8 model (ONNX Runtime)") == 1


def test_escalates_in_order_of_cost_and_keeps_sensitive_layers_fp32(run):
    # four calibration attempts and one fp32 layer lose 2 points; two fp32 layers lose 0.3
    script = Scripted([FP32_VAL - 0.02] * 5 + [FP32_VAL - 0.003])
    result = quantize_checked(run, ControlSettings(max_drop=0.5, calibration=8, min_speedup=0),
                              validation=script)
    changes = [a["change"] for a in result["attempts"]]
    assert [c.split(" ")[0] for c in changes[:4]] == ["default:", "percentile", "entropy", "minmax"]
    assert "32 images" in changes[3]  # four times the calibration images
    assert [len(a.get("exclude", [])) for a in result["attempts"]] == [0, 0, 0, 0, 1, 2]
    assert [a["meets"] for a in result["attempts"]] == [False] * 5 + [True]
    assert all(a["drop"] == pytest.approx(2.0) for a in result["attempts"][:5])
    assert result["accepted"] and len(script.seen) == 6  # stopped at the first that met
    ranking = [r["node"] for r in result["sensitivity"]["ranking"]]
    assert result["fp32_layers"] == ranking[:2] and set(ranking[:2]) <= set(result["fp32_nodes"])
    assert all(r["error"] >= 0 for r in result["sensitivity"]["ranking"])
    int8 = run / "export" / "model.int8.onnx"
    quantized = reads_dequantized(int8, ranking[:4])
    assert quantized[ranking[0]] is False and quantized[ranking[1]] is False   # really fp32
    assert quantized[ranking[2]] is True and quantized[ranking[3]] is True     # the rest int8
    saved = json.loads((run / "export" / "quantize.json").read_text())
    assert len(saved["attempts"]) == 6 and all({"val_fp32", "val_int8", "drop"} <= set(a) for a in saved["attempts"])


def test_refusal_keeps_fp32_and_names_the_next_step(run, monkeypatch, capsys):
    (run / "export" / "model.int8.onnx").write_bytes(b"an earlier int8 model")
    monkeypatch.setattr(control.Validation, "of_run", classmethod(lambda cls, *a: Scripted([0.1])))
    assert main(["quantize", str(run), "--max-drop", "0.5", "--calibration", "8"]) == 2
    out, err = capsys.readouterr()
    assert "int8 refused, fp32 stays the model" in err and "--qat-epochs" in err
    result = json.loads(out)
    assert not result["accepted"] and result["path"] is None
    assert not (run / "export" / "model.int8.onnx").exists()      # nothing passes for a usable int8
    assert (run / "export" / REJECTED).is_file()
    saved = json.loads((run / "export" / "quantize.json").read_text())
    assert not saved["accepted"] and saved["attempts"][-1]["exclude"] and "int8" not in saved["test"]
    assert json.loads((run / "test_metrics.json").read_text())["int8"]["accepted"] is False


def test_accurate_but_not_faster_is_refused(run, monkeypatch):
    monkeypatch.setattr(control, "speeds", lambda a, b: {"fp32": {"b1_ms": 1.0, "b64_ms": 9.0},
                                                         "int8": {"b1_ms": 1.25, "b64_ms": 8.0},
                                                         "speedup_b1": 0.8, "speedup_b64": 1.125})
    result = quantize_checked(run, ControlSettings(calibration=8), validation=Scripted([FP32_VAL]))
    assert not result["accepted"] and "not faster than fp32 at batch 1 (0.80x" in result["reason"]
    assert not (run / "export" / "model.int8.onnx").exists() and (run / "export" / REJECTED).is_file()


def test_bad_input_and_missing_data_are_one_line(run, tmp_path, capsys):
    for bad in ("-0.5", "lots", "nan"):
        with pytest.raises(SystemExit):
            main(["quantize", str(run), "--max-drop", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--max-drop" in err[0] and "Traceback" not in err[0]
    with pytest.raises(GraftError, match="max-drop"):
        quantize_checked(run, ControlSettings(max_drop=-1))
    moved = tmp_path / "copy"
    shutil.copytree(run, moved)
    data = config.resolve(run / "config.yaml").data.path
    shutil.move(data, str(tmp_path / "elsewhere"))
    try:
        assert main(["quantize", str(moved)]) == 2
        err = capsys.readouterr().err
        assert "cannot check int8's accuracy" in err and "validation split" in err and "Traceback" not in err
    finally:
        shutil.move(str(tmp_path / "elsewhere"), data)


def test_quantization_aware_training_is_the_last_step_when_allowed(run):
    result = quantize_checked(run, ControlSettings(max_drop=0.5, calibration=8, min_speedup=0, qat_epochs=1,
                                                   qat_lr=1e-3, max_fp32_share=0.05), validation=Scripted([0.1]),
                              qat=qat_step)
    qat = result["attempts"][-1]
    assert qat["change"].startswith("quantization-aware training, 1 epoch(s)")
    assert all("qat_run" not in a for a in result["attempts"][:-1]) and len(result["attempts"]) >= 5
    inner = json.loads((run.parent / f"{run.name}-qat" / "export" / "quantize.json").read_text())
    assert inner["baseline_val"] == FP32_VAL            # its drop counts against the source's fp32
    assert qat["val_int8"] == inner["val"]["int8"] and qat["qat_run"] == str(run.parent / f"{run.name}-qat")
    if result["accepted"]:  # the QAT run's int8 file is the model
        assert result["path"].startswith(qat["qat_run"])
    else:
        assert (run.parent / f"{run.name}-qat" / "export" / REJECTED).is_file()


def test_a_layer_kept_fp32_behind_a_relu6_reads_clipped_values(tmp_path):
    """ORT's quantizer drops a Clip whose input it quantizes (the uint8 range clips instead); a conv
    kept fp32 behind it must still read clipped values, so the Clip stays with it."""
    from onnx import TensorProto, helper, numpy_helper
    from graftnet.export.quantize import quantize_onnx
    from graftnet.export.runtime import session
    rng = np.random.default_rng(0)
    w = {k: numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32), k)
         for k, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1)), ("w3", (4, 8, 1, 1)))}
    lo, hi = numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Clip", ["a", "lo", "hi"], ["r"], name="relu6"),
         helper.make_node("Conv", ["r", "w2"], ["b"], name="conv2"),
         helper.make_node("Conv", ["r", "w3"], ["c"], name="conv3"),
         helper.make_node("Add", ["b", "c"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])], [*w.values(), lo, hi])
    fp32 = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    x = rng.normal(0, 2, (16, 3, 8, 8)).astype(np.float32)
    int8 = quantize_onnx(fp32, tmp_path / "q.onnx", "static", x, fp32_ends=False, exclude=["conv2"])
    assert reads_dequantized(int8, ["conv2", "conv3"]) == {"conv2": False, "conv3": True}
    y32, y8 = (session(p).run(None, {"x": x})[0] for p in (fp32, int8))
    assert np.abs(y8 - y32).max() < 0.05 * np.abs(y32).max()   # conv2 saw ReLU6's output, not conv1's
