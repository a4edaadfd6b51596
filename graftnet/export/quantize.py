"""Post-training int8 quantization of an exported model with ONNX Runtime's tools.

static (default): weights and activations in int8 through the backbone (its first convolution and
the head stay fp32, see below). Activation ranges come from calibration: a few hundred of the run's
own training images, preprocessed exactly as at inference, pass through the fp32 model. QDQ format,
per-channel weights. `graft quantize` wraps this in an accuracy control (export/control.py): it
checks the result on the validation split and changes calibration or keeps layers in fp32 when int8
loses too much.

Choices, measured with `bench/quantize.py --explore` on EfficientNet-Lite0 at 128 px (BENCHMARKS.md,
int8 quantization and QAT):
- u8s8 (uint8 activations, int8 weights) is ORT's fast x86 path (MLAS multiplies u8 x s8). u8u8 kept
  accuracy but ran 4-5.5x SLOWER than fp32: MLAS has no fast u8u8 kernel for it.
- The weights' width depends on the CPU (weight_reduce_range). Without VNNI, vpmaddubsw adds pairs of
  u8 x s8 products into int16 and saturates: full 8-bit weights lost 7 points on AVX2, 7-bit weights
  (reduce_range=True) avoid the overflow at the same speed. With VNNI (avx512_vnni, avx_vnni) or AMX
  (amx_int8) the products accumulate in int32 without saturation: 8-bit weights are as fast and lose
  0.41 points instead of 1.86 (AVX-512 VNNI, all 10,000 CIFAR-10 test images).
- The first convolution and the head stay fp32 (fp32_ends): they are a small part of the work,
  and keeping them recovers about half of the remaining loss.
- QDQ rather than QOperator: about the same speed in a trial (ORT fuses QDQ pairs into QLinearConv),
  and a QDQ graph stays a standard ONNX graph that other runtimes (TensorRT, OpenVINO) read.

dynamic: int8 weights of the linear layers only (the head), activations quantized on the fly; the
backbone stays fp32. No calibration, and little speed-up: the head is a small part of the work.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np

from ..errors import GraftError
from ..features import cpu_flags
from ..io import atomic_write, remove_stale_temps, temp_dir, terminate_as_exit
from ..progress import bar, log
from .runtime import PREPROCESS_FILE, evaluate_onnx, read_preprocess, session, to_input

METHODS = ("static", "dynamic")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")   # ORT's CalibrationMethod, cheapest first
# CPU flags (/proc/cpuinfo) of instructions that multiply u8 x s8 into int32 without int16 saturation
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def weight_reduce_range(flags: set[str] | None = None) -> bool:
    """reduce_range for int8 weights on a CPU with these flags (default: this CPU's): False (full
    8-bit weights, faster and more accurate) where VNNI or AMX multiplies without saturating,
    True (7-bit weights) elsewhere, where 8-bit weights overflow vpmaddubsw's int16 sums."""
    flags = cpu_flags() if flags is None else flags
    return not any(f in flags for f in INT8_DOT_FLAGS)


def weight_format(reduce_range: bool, flags: set[str] | None = None) -> str:
    """A line for logs and results: which weights, and why."""
    flags = cpu_flags() if flags is None else flags
    found = [f for f in INT8_DOT_FLAGS if f in flags]
    return (f"{7 if reduce_range else 8}-bit weights (reduce_range={reduce_range}; CPU int8 dot "
            f"product: {', '.join(found) if found else 'none, no VNNI/AMX'})")


def calibration_images(cfg, spec, n: int, seed: int = 0):
    """n images of the run's training split, spread over its classes (an ImageSet)."""
    from ..data.images import config_splits, load_images
    from ..data.labels import open_data
    source = open_data(cfg.data, cfg.cache_dir)
    train = config_splits(source, cfg.data)["train"]
    pick = np.random.default_rng(seed).permutation(len(train))[:n]
    return load_images(source, [train[i] for i in sorted(pick)], spec.image_size, skip_bad=True,
                       workers=cfg.data.workers, gray=cfg.data.grayscale)


def held_out_images(cfg, spec, split: str = "test"):
    """The run's whole test (or validation) split, decoded as its evaluation decoded it (from the
    decoded-image cache when it is there); None when the run's data is no longer where it was."""
    from ..data.decoded import decode_split
    from ..data.images import config_splits
    from ..data.labels import open_data
    try:
        source = open_data(cfg.data, cfg.cache_dir)
        samples = config_splits(source, cfg.data)[split]
        with bar(len(samples), f"decoding the {split} split") as advance:
            images = decode_split(source, samples, spec.image_size, cfg.data, cfg.cache_dir, advance)
    except (GraftError, OSError) as e:
        log(f"[yellow]the run's {split} split is not readable ({e}); no {split} accuracy for the int8 model[/]")
        return None
    return images if len(images) else None


def predictions(model_path: Path, images) -> np.ndarray:
    """Top-1 class indices of an ONNX model on an ImageSet (evaluate_onnx), with a progress bar."""
    with bar(len(images), f"scoring the test split: {model_path.name}") as advance:
        return np.asarray(evaluate_onnx(model_path, images, advance=advance)["predictions"])


def _reader(batches: list[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {input_name: x}

        def rewind(self):
            self.items = iter(batches)
    return Reader()


def _gemm_to_matmul(model) -> None:
    """Gemm(A, B, C) with constant B -> MatMul(A, B') + C: quantize_dynamic handles MatMul, not Gemm."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        name = node.input[1] + "_matmul"
        model.graph.initializer.append(numpy_helper.from_array(w.T.copy() if attrs.get("transB") else w,
                                                               name))
        product = node.output[0] + "_matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product if len(node.input) > 2
                                                                         else node.output[0]]))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def prepare(fp32_path: str | Path, prepared: str | Path) -> Path:
    """ORT's recommended preparation: graph optimisation (fusions, BatchNorm folded) + shape
    inference, so that every Conv/Gemm and its activation get quantization parameters. Node names
    of the prepared graph are the ones `exclude` (quantize_onnx) names."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    quant_pre_process(str(fp32_path), str(prepared))
    return Path(prepared)


def end_nodes(prepared: str | Path) -> list[str]:
    """fp32_ends: the first convolution (3 input channels: little work, and every later layer
    inherits its error) and the head's Gemms."""
    import onnx
    nodes = onnx.load(str(prepared)).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    return convs[:1] + [n.name for n in nodes if n.op_type == "Gemm"]


def with_activations(prepared: str | Path, names: list[str]) -> list[str]:
    """`names` and the Relu/Clip nodes that produce their inputs. ORT's QDQ quantizer drops a Relu or
    Clip whose input is quantized (the uint8 range clips instead, QDQRemovableActivation); a node
    kept in fp32 behind it would then read the unclipped values, so the activation stays too."""
    import onnx
    nodes = onnx.load(str(prepared)).graph.node
    producer = {o: n for n in nodes for o in n.output}
    wanted = set(names)
    extra = [producer[i].name for n in nodes if n.name in wanted for i in n.input
             if i in producer and producer[i].op_type in ("Relu", "Clip")]
    return list(dict.fromkeys(list(names) + extra))


def unquantize_inputs(model, names: set[str]) -> int:
    """Let the nodes `names` read fp32 again. ORT's QDQ quantizer puts one Quantize/DequantizeLinear
    pair on a tensor and gives its output to every consumer, so a node kept out of quantization
    (nodes_to_exclude) still reads int8-rounded values when another reader of its input is quantized.
    Rewire such inputs to the tensor before the pair, and drop pairs no one reads any more.
    Returns how many inputs changed."""
    producer = {o: n for n in model.graph.node for o in n.output}
    changed = 0
    for node in model.graph.node:
        if node.name not in names:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                changed += 1
    while True:  # Q/DQ nodes whose outputs nothing reads (graph outputs count as read)
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for init in [t for t in model.graph.initializer if t.name not in read]:  # their scales, zero points
        model.graph.initializer.remove(init)
    return changed


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, method: str = "static",
                  calibration: np.ndarray | None = None, batch_size: int = 32,
                  reduce_range: bool | None = None, quant_format: str = "qdq",
                  weight_type: str = "int8", fp32_ends: bool = True, calibrate_method: str = "minmax",
                  exclude: list[str] | tuple = (), prepared: str | Path | None = None) -> Path:
    """Write an int8 copy of an fp32 ONNX model. static needs `calibration`: a normalised float32
    NCHW array (preprocessed training images). reduce_range None: by this CPU (weight_reduce_range).
    fp32_ends keeps the first convolution and the head's Gemms in fp32; `exclude` names more nodes
    (of the prepared graph) to keep in fp32. `prepared`: a graph `prepare` made already (the
    accuracy control quantizes one several times)."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    if method not in METHODS:
        raise GraftError(f"unknown quantization method {method!r}: choose from {', '.join(METHODS)}")
    if calibrate_method not in CALIBRATION_METHODS:
        raise GraftError(f"unknown calibration method {calibrate_method!r}: choose from "
                         f"{', '.join(CALIBRATION_METHODS)}")
    if reduce_range is None:
        reduce_range = weight_reduce_range()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    # beside the result, not in the system's temp folder: the same disk, and a killed run's leftover
    # is found and removed by the next (remove_stale_temps)
    with terminate_as_exit(), temp_dir(out_path) as tmp:
        if prepared is None:
            prepared = prepare(fp32_path, Path(tmp) / "prepared.onnx")
        if method == "static":
            if calibration is None or not len(calibration):
                raise GraftError("static quantization needs calibration images")
            name = session(prepared).get_inputs()[0].name
            skip = with_activations(prepared, (end_nodes(prepared) if fp32_ends else []) + list(exclude))
            batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
            calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                     "entropy": CalibrationMethod.Entropy}[calibrate_method]
            def write(t: str) -> None:
                # ORT's histogram calibrators print their progress: keep stdout for graftnet's results
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(
                        str(prepared), t, _reader(batches, name), per_channel=True, reduce_range=reduce_range,
                        nodes_to_exclude=list(dict.fromkeys(skip)),
                        quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
                        calibrate_method=calib)
                model = onnx.load(t)
                if quant_format == "qdq" and unquantize_inputs(model, set(skip)):
                    onnx.save(model, t)
            atomic_write(out_path, write)
        else:
            model = onnx.load(str(prepared))
            _gemm_to_matmul(model)
            dynamic_in = Path(tmp) / "dynamic.onnx"
            onnx.save(model, str(dynamic_in))
            atomic_write(out_path, lambda t: quantize_dynamic(
                str(dynamic_in), t, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                per_channel=True, reduce_range=reduce_range))
    return out_path


def fp32_model(run_dir: str | Path):
    """(spec, cfg, RUN/export/model.onnx, its preprocess.json): the fp32 ONNX model int8 starts
    from, exported first when it is not there."""
    from .exporter import export_run, load_run
    run_dir = Path(run_dir)
    _, spec, cfg = load_run(run_dir)
    from ..model import single_label_only
    single_label_only(spec, run_dir, "int8 is kept only when its validation accuracy (one class per image) "
                      "holds, which a multi-label model has not; `graft export` gives its fp32 ONNX model")
    fp32 = run_dir / "export" / "model.onnx"
    if not fp32.is_file() or not (fp32.parent / PREPROCESS_FILE).is_file():
        export_run(run_dir, "onnx", fp32)
    return spec, cfg, fp32, read_preprocess(fp32)


def quantize_run(run_dir: str | Path, method: str = "static", calibration: int = 256,
                 out: str | Path | None = None, seed: int = 0) -> dict:
    """One int8 model of a run, no accuracy control (`graft quantize` runs control.quantize_checked,
    which checks and escalates): RUN/export/model.int8.onnx (exported to model.onnx first if needed),
    preprocess.json beside it. Returns {"path", "method", "calibration_images", "size_bytes",
    "fp32_size_bytes", "agreement", "agreement_images", "test_accuracy_fp32", "test_accuracy_int8",
    "test_images"}: both models' top-1 accuracy on the run's whole test split, and the share of
    those images where int8's class equals fp32's (when the run's data is gone the accuracies are
    None, and agreement is measured on what `exporter.check_images` finds)."""
    from .exporter import check_images
    if method not in METHODS:
        raise GraftError(f"unknown quantization method {method!r}: choose from {', '.join(METHODS)}")
    if calibration < 1:
        raise GraftError(f"--calibration {calibration}: need at least one image")
    spec, cfg, fp32, pre = fp32_model(run_dir)
    out = Path(out) if out else fp32.with_name("model.int8.onnx")
    calib = None
    if method == "static":
        images = calibration_images(cfg, spec, calibration, seed)
        calib = to_input([im.numpy() for im in images.images], pre)
        log(f"calibrating on {len(images)} training images")
    quantize_onnx(fp32, out, method, calib)
    remove_stale_temps(out.parent)
    if out.parent != fp32.parent:
        shutil.copyfile(fp32.parent / PREPROCESS_FILE, out.parent / PREPROCESS_FILE)
    # Agreement alone hides what a user decides on: how much accuracy int8 costs. Both models are
    # scored on the same images, so the difference is int8's alone.
    test = held_out_images(cfg, spec)
    acc = {"fp32": None, "int8": None}
    if test is not None:
        labels = np.asarray(test.labels)
        a, b = predictions(fp32, test), predictions(out, test)
        acc = {"fp32": float((a == labels).mean()), "int8": float((b == labels).mean())}
        compared_on = f"{len(a)} test images"
    else:
        check, compared_on = check_images(spec, cfg, 64)
        x = to_input([im.numpy() for im in check.images], pre)
        a, b = (session(m).run(None, {pre["input_name"]: x})[0].argmax(1) for m in (fp32, out))
    agree = float((a == b).mean())
    result = {"path": str(out), "method": method, "calibration_images": 0 if calib is None else len(calib),
              "size_bytes": out.stat().st_size, "fp32_size_bytes": fp32.stat().st_size,
              "agreement": agree, "agreement_images": len(a), "test_accuracy_fp32": acc["fp32"],
              "test_accuracy_int8": acc["int8"], "test_images": len(a) if test is not None else 0}
    scores = f"test accuracy int8 {acc['int8']:.4f} vs fp32 {acc['fp32']:.4f}; " if test is not None else ""
    log(f"int8 ({method}) model {out}: {result['size_bytes'] / 1e6:.1f} MB "
        f"(fp32 {result['fp32_size_bytes'] / 1e6:.1f} MB); {scores}top-1 agrees with fp32 on "
        f"{agree:.1%} of {compared_on}")
    if test is not None and acc["fp32"] - acc["int8"] > 0.01:
        log(f"[yellow]warning: int8 loses {100 * (acc['fp32'] - acc['int8']):.1f} points of test accuracy "
            "against fp32; try quantization-aware training (--qat-epochs N)[/]")
    return result
