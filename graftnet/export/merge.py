"""Several exported models of one input as one ONNX file: an ensemble that deploys as a single model.

The members must take the same input (the same image size, mean and std: their preprocess.json
agrees) and give logits over the same classes. The merged graph feeds its input to every member and
returns log(sum_i w_i softmax(logits_i)), the logits `graft ensemble` defines (softmax gives the
averaged probabilities back, argmax is the ensemble's vote), so every runtime that reads a graftnet
export (graft predict, OnnxClassifier, preprocess.json) runs it unchanged.

Written here because onnx.compose.merge_models chains graphs (one's outputs into the next's inputs);
side by side on one input is a prefix per member and a few nodes, which onnx.compose.add_prefix and
onnx.helper give.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose, helper, numpy_helper

from ..errors import GraftError
from ..io import atomic_write_bytes

INPUT, OUTPUT = "input", "logits"


def merge_onnx(paths: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """One ONNX model at `out` averaging the members' class probabilities (equal weights unless
    `weights`, which must sum to 1). Returns `out`."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise GraftError(f"an ensemble needs at least two members, got {len(paths)}")
    weights = weights or [1.0 / len(paths)] * len(paths)
    if len(weights) != len(paths) or abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
        raise GraftError(f"ensemble weights {weights}: need one per member, each >= 0, summing to 1")
    members = [onnx.load(str(p)) for p in paths]
    first = members[0]
    for path, m in zip(paths, members):
        names = ([i.name for i in m.graph.input], [o.name for o in m.graph.output])
        if names != ([INPUT], [OUTPUT]):
            raise GraftError(f"{path}: not a graftnet export (inputs {names[0]}, outputs {names[1]}; "
                             f"expected [{INPUT!r}] -> [{OUTPUT!r}])")
        if _shape(m.graph.input[0]) != _shape(first.graph.input[0]):
            raise GraftError(f"{path}: input shape {_shape(m.graph.input[0])} differs from {paths[0]}'s "
                             f"{_shape(first.graph.input[0])}; ensemble members must share one input")
        if _shape(m.graph.output[0])[1:] != _shape(first.graph.output[0])[1:]:
            raise GraftError(f"{path}: {_shape(m.graph.output[0])[1:]} classes out, {paths[0]} gives "
                             f"{_shape(first.graph.output[0])[1:]}")
    opset = max(_onnx_opset(m) for m in members)
    nodes, inits, probs = [], [], []
    for i, m in enumerate(members):
        m = _at_opset(m, opset)
        m = compose.add_prefix(m, f"m{i}_")
        g = m.graph
        nodes += [helper.make_node("Identity", [INPUT], [f"m{i}_{INPUT}"])] + list(g.node)
        inits += list(g.initializer)
        w = f"m{i}_weight"
        inits.append(numpy_helper.from_array(_scalar(weights[i]), w))
        nodes += [helper.make_node("Softmax", [f"m{i}_{OUTPUT}"], [f"m{i}_prob"], axis=-1),
                  helper.make_node("Mul", [f"m{i}_prob", w], [f"m{i}_weighted"])]
        probs.append(f"m{i}_weighted")
    nodes += [helper.make_node("Sum", probs, ["mixture"]),
              # a class every member gives probability 0 would be -inf: floor at the smallest normal float
              helper.make_node("Max", ["mixture", "tiny"], ["mixture_floored"]),
              helper.make_node("Log", ["mixture_floored"], [OUTPUT])]
    inits.append(numpy_helper.from_array(_scalar(1.1754944e-38), "tiny"))
    graph = helper.make_graph(nodes, "ensemble", [first.graph.input[0]], [first.graph.output[0]], inits)
    domains = {d.domain: d.version for m in members for d in m.opset_import}
    domains[""] = opset
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains.items()],
                               producer_name="graftnet-ensemble")
    merged.ir_version = max(m.ir_version for m in members)
    onnx.checker.check_model(merged)
    out = Path(out)
    atomic_write_bytes(out, merged.SerializeToString())
    return out


def _shape(value) -> list:
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


def _onnx_opset(model) -> int:
    return next(d.version for d in model.opset_import if d.domain in ("", "ai.onnx"))


def _at_opset(model, opset: int):
    from onnx import version_converter
    return model if _onnx_opset(model) == opset else version_converter.convert_version(model, opset)


def _scalar(value: float):
    import numpy as np
    return np.array(value, dtype=np.float32)

