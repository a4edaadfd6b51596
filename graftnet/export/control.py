"""Accuracy-controlled int8: quantize, check on the validation split, and escalate until int8 keeps
the accuracy it is allowed to lose, or refuse and keep fp32.

`graft quantize RUN --max-drop 0.5` runs `quantize_checked`. As NNCF's
`quantize_with_accuracy_control` and Intel Neural Compressor's accuracy-driven tuning do, it
measures the int8 model against fp32 on the run's VALIDATION split (the test split decides
nothing; it is scored once, at the end, for the chosen model only) and, while the drop is too large,
tries the next step in order of cost:
1. calibration: MinMax (the default) -> Percentile -> Entropy on the same images, then the best of
   those on four times as many images;
2. sensitive layers in fp32: each quantized node is kept in fp32 alone, in a quick int8 model
   calibrated on a few images, and ranked by how close that brings the logits to fp32's
   (exclude-one-at-a-time, as NNCF ranks); then the 1, 2, 4, ... most helpful stay fp32. The
   signal-to-quantization-noise ratio of what each node reads (ORT's qdq_loss_debug tools) is
   recorded beside it: on EfficientNet-Lite0 it did not predict which layers matter (BENCHMARKS.md);
3. quantization-aware training (compress/qat.py), only when the user allowed epochs for it.
The chosen int8 model must also be faster than fp32 at batch 1 (timed in turns with fp32); when no
attempt meets both, the int8 file is renamed model.int8.rejected.onnx and fp32 stays the model.
Every attempt, with its numbers, goes to RUN/export/quantize.json; the chosen model's accuracies
also go to the run's test_metrics.json ("int8") and a section of its report.html.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path

import numpy as np

from ..errors import GraftError
from ..io import atomic_write_json, atomic_write_text, remove_stale_temps, temp_dir, terminate_as_exit
from ..progress import bar, log
from .quantize import (CALIBRATION_METHODS, METHODS, calibration_images, cpu_flags, end_nodes, fp32_model,
                       held_out_images, prepare, quantize_onnx, weight_format, weight_reduce_range,
                       with_activations)
from .runtime import PREPROCESS_FILE, measure_latency, session, to_input

RESULT_FILE = "quantize.json"
REJECTED = "model.int8.rejected.onnx"


@dataclass
class ControlSettings:
    max_drop: float = 0.5             # points of validation accuracy int8 may lose against fp32
    method: str = "static"
    calibration: int = 256            # training images of the first attempts (x4 in the last one)
    qat_epochs: int = 0               # 0: no quantization-aware training (the refusal names it)
    qat_lr: float = 5e-5
    min_speedup: float = 1.0          # int8 must be faster than this times fp32 at batch 1
    max_fp32_share: float = 0.5       # at most this share of the quantized nodes goes back to fp32
    reduce_range: bool | None = None  # None: by the CPU (quantize.weight_reduce_range)
    sensitivity_images: int = 32      # calibration images the per-layer ranking runs on
    seed: int = 0

    def check(self) -> None:
        if not np.isfinite(self.max_drop) or self.max_drop < 0:
            raise GraftError(f"--max-drop {self.max_drop}: a number of points >= 0")
        if self.method not in METHODS:
            raise GraftError(f"unknown quantization method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.calibration < 1:
            raise GraftError(f"--calibration {self.calibration}: need at least one image")
        if self.qat_epochs < 0 or self.qat_lr <= 0:
            raise GraftError("--qat-epochs >= 0 and --qat-lr > 0")


class Validation:
    """The run's validation split, preprocessed once, scored for any exported model of the run."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, flip: bool = False):
        self.x, self.labels, self.flip = x, np.asarray(labels), flip

    @classmethod
    def of_run(cls, cfg, spec, pre: dict, run_dir: Path) -> "Validation":
        images = held_out_images(cfg, spec, "val")
        if images is None:
            raise GraftError(f"{run_dir}: cannot check int8's accuracy: the run's validation split "
                             f"(data {cfg.data.path}) is not readable or empty; put the data back, or "
                             "quantize without the check in Python (export.quantize.quantize_run)")
        x = np.concatenate([to_input([im.numpy() for im in images.images[i:i + 256]], pre)
                            for i in range(0, len(images), 256)])
        return cls(x, np.asarray(images.labels), bool(pre.get("flip_average")))

    def predictions(self, model_path: Path, batch_size: int = 64) -> np.ndarray:
        sess = session(model_path)
        name = sess.get_inputs()[0].name
        out = []
        with bar(len(self.x), f"validation: {Path(model_path).name}") as advance:
            for i in range(0, len(self.x), batch_size):
                x = self.x[i:i + batch_size]
                y = sess.run(None, {name: x})[0]
                if self.flip:  # the run averages the mirror's logits in (flip_views), as OnnxClassifier
                    y = (y + sess.run(None, {name: np.ascontiguousarray(x[..., ::-1])})[0]) / 2
                out.append(y.argmax(1))
                advance(len(x))
        return np.concatenate(out)

    def accuracy(self, model_path: Path) -> float:
        return float((self.predictions(model_path) == self.labels).mean())


def sensitivity(prepared: Path, int8: Path, x: np.ndarray, workdir: Path) -> list[tuple[str, float]]:
    """(node, SQNR in dB) for every quantized node of a QDQ model, noisiest first. A node's number is
    the lowest signal-to-quantization-noise ratio among what it reads: an activation before vs after
    its QuantizeLinear/DequantizeLinear pair (same model, same images; rounding, and clipping beyond
    the calibrated range), or its weight dequantized vs the fp32 weight of the prepared graph
    (BatchNorm folded as in the int8 one)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_signal_to_quantization_noice_ratio,
                                                         compute_weight_error, create_weight_matching,
                                                         modify_model_output_intermediate_tensors)
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX
    from .quantize import _reader
    graph = onnx.load(str(int8)).graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    weights = compute_weight_error(create_weight_matching(str(prepared), str(int8)))
    augmented = workdir / "augmented.onnx"
    modify_model_output_intermediate_tensors(str(int8), str(augmented), ["QuantizeLinear", "DequantizeLinear"])
    acts = collect_activations(str(augmented), _reader([x], session(int8).get_inputs()[0].name))
    ranked = []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scores = []
        for name in node.input:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # an activation
                if q.input[0] in acts and dq.output[0] in acts:
                    # within the uint8 range: ORT drops a Relu/Clip before a Quantize (the range clips
                    # instead), so outside it lies what that activation removes, not noise
                    scale = float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0])
                    zero = float(numpy_helper.to_array(inits[q.input[2]]).reshape(-1)[0]) if len(q.input) > 2 else 0.0
                    pre = [np.clip(a, -zero * scale, (255 - zero) * scale) for a in acts[q.input[0]]]
                    scores.append(compute_signal_to_quantization_noice_ratio(pre, acts[dq.output[0]]))
            elif dq.input[0].endswith(TENSOR_NAME_QUANT_SUFFIX):  # a weight (an initializer)
                w = dq.input[0][:-len(TENSOR_NAME_QUANT_SUFFIX)]
                if w in weights:
                    scores.append(weights[w])
        if scores and node.name:
            ranked.append((node.name, float(min(scores))))
    return sorted(ranked, key=lambda r: r[1])


def logits(model_path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(model_path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def exclusion_ranking(candidates: list[str], x: np.ndarray, quantize, reference: np.ndarray) -> list[tuple[str, float]]:
    """(node, error) for each candidate, most helpful first: `quantize(exclude)` makes an int8 model
    with those nodes in fp32 (a cheap one, calibrated on `x`), and the error is the mean squared
    difference of its logits on `x` from fp32's (`reference`). Exclude-one-at-a-time: it measures
    what keeping a node in fp32 does to the output, which noise ratios (`sensitivity`) do not tell."""
    out = []
    with bar(len(candidates), "ranking layers: each one alone in fp32") as advance:
        for name in candidates:
            out.append((name, float(np.mean((logits(quantize([name]), x) - reference) ** 2))))
            advance(1)
    return sorted(out, key=lambda r: r[1])


def speeds(fp32: Path, int8: Path, rounds: int = 3) -> dict:
    """Latency of both models at batch 1 and 64, timed in turns (`rounds` times, each the median
    of repeats after warmup) so that load from other processes hits both alike; medians over rounds."""
    out = {"fp32": {}, "int8": {}, "rounds": rounds}
    for batch, repeats in ((1, 30), (64, 3)):
        times = {"fp32": [], "int8": []}
        for _ in range(rounds):
            for name, path in (("fp32", fp32), ("int8", int8)):
                times[name].append(measure_latency(path, batch, repeats, warmup=2)["median_ms"])
        for name in times:
            out[name][f"b{batch}_ms"] = round(statistics.median(times[name]), 3)
            out[name][f"b{batch}_ms_rounds"] = [round(t, 3) for t in times[name]]
        out[f"speedup_b{batch}"] = round(out["fp32"][f"b{batch}_ms"] / out["int8"][f"b{batch}_ms"], 3)
    return out


def _points(fp32: float, int8: float) -> float:
    return round(100 * (fp32 - int8), 3)


def quantize_checked(run_dir: str | Path, settings: ControlSettings | None = None, out: str | Path | None = None,
                     *, baseline_val: float | None = None, refuse: bool = True, record: bool = True,
                     validation: Validation | None = None, qat=None) -> dict:
    """int8 model of a run that loses at most settings.max_drop points of validation accuracy and
    is faster than fp32 at batch 1, or a refusal. Returns the record written to
    RUN/export/quantize.json: "accepted", "path" (None when refused), "reason", "attempts" (one per
    try: what changed, validation accuracy fp32/int8, drop in points, seconds), "fp32_layers" (nodes
    kept fp32 beyond the first convolution and head), "weights", "calibration", "val", "test",
    "latency", "control_seconds". `baseline_val`: the fp32 validation accuracy the drop is measured
    against (default: this run's fp32 model; QAT passes its source run's). `qat`: the last step,
    `qat(run_dir, **settings) -> QAT run folder` (compress.qat.qat_step; passed in, since QAT's
    own export runs this control: importing it here would make the two modules a cycle). refuse=False keeps the
    best int8 file even when it misses (QAT's own export; the caller decides). record=False leaves
    test_metrics.json and report.html alone (the caller writes them later with record_int8)."""
    s = settings or ControlSettings()
    s.check()
    started = time.perf_counter()
    run_dir = Path(run_dir)
    spec, cfg, fp32, pre = fp32_model(run_dir)
    out = Path(out) if out else fp32.with_name("model.int8.onnx")
    if out.parent != fp32.parent:
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / PREPROCESS_FILE).write_bytes((fp32.parent / PREPROCESS_FILE).read_bytes())
    val = validation or Validation.of_run(cfg, spec, pre, run_dir)
    val_fp32 = val.accuracy(fp32)
    base = val_fp32 if baseline_val is None else baseline_val
    rr = weight_reduce_range() if s.reduce_range is None else s.reduce_range
    flags = cpu_flags()
    record_ = {"run": str(run_dir), "settings": asdict(s), "method": s.method, "max_drop": s.max_drop,
               "weights": weight_format(rr, flags), "reduce_range": rr,
               "cpu_int8_flags": sorted(f for f in flags if "vnni" in f or f.startswith("amx")),
               "val_images": int(len(val.labels)), "val_fp32": val_fp32, "baseline_val": base,
               "attempts": []}
    log(f"int8 accuracy control: validation accuracy fp32 {val_fp32:.4f} on {len(val.labels)} images; "
        f"allowed drop {s.max_drop:g} points; {record_['weights']}")
    best = None   # (drop, path, attempt)

    with terminate_as_exit(), temp_dir(out) as tmp:
        tmp = Path(tmp)
        prepared = prepare(fp32, tmp / "prepared.onnx")
        ends = end_nodes(prepared) if s.method == "static" else []
        calib = {}

        def calibration(n: int) -> np.ndarray:
            if n not in calib:
                images = calibration_images(cfg, spec, n, s.seed)
                calib[n] = to_input([im.numpy() for im in images.images], pre)
            return calib[n]

        def attempt(change: str, path: Path | None = None, val_int8: float | None = None, **kw) -> bool:
            nonlocal best
            t0 = time.perf_counter()
            if path is None:
                path = tmp / f"attempt{len(record_['attempts'])}.onnx"
                images = kw.pop("images", s.calibration)
                quantize_onnx(fp32, path, s.method, calibration(images) if s.method == "static" else None,
                              reduce_range=rr, prepared=prepared, **kw)
                kw["images"] = images if s.method == "static" else 0
            val_int8 = val.accuracy(path) if val_int8 is None else val_int8
            drop = _points(base, val_int8)
            a = {"attempt": len(record_["attempts"]), "change": change, **kw,
                 "val_fp32": base, "val_int8": val_int8, "drop": drop, "meets": drop <= s.max_drop,
                 "seconds": round(time.perf_counter() - t0, 2)}
            record_["attempts"].append(a)
            log(f"attempt {a['attempt']}: {change}: validation fp32 {base:.4f} int8 {val_int8:.4f}, drop "
                f"{drop:.2f} points ({'meets' if a['meets'] else 'over'} {s.max_drop:g})")
            if best is None or drop < best[0]:
                best = (drop, path, a)
            return a["meets"]

        met = False
        if s.method == "dynamic":  # nothing to tune: one attempt
            met = attempt("dynamic: int8 weights of the head, activations quantized at run time")
        else:
            met = attempt(f"default: MinMax calibration on {s.calibration} images, "
                          f"{'7' if rr else '8'}-bit weights, first convolution and head fp32",
                          calibrate_method="minmax")
            # 1. calibration: method, then more images with the best method so far
            for method in CALIBRATION_METHODS[1:]:
                if met:
                    break
                met = attempt(f"{method} calibration on {s.calibration} images", calibrate_method=method)
            if not met:
                method = best[2]["calibrate_method"]
                met = attempt(f"{method} calibration on {4 * s.calibration} images",
                              calibrate_method=method, images=4 * s.calibration)
            # 2. the noisiest quantized nodes back to fp32, 1, 2, 4, ... of them
            if not met:
                chosen = {k: best[2][k] for k in ("calibrate_method", "images")}
                t0 = time.perf_counter()
                x = calibration(chosen["images"])[:s.sensitivity_images]
                noise = dict(sensitivity(prepared, best[1], x, tmp))   # every quantized node, its SQNR
                candidates = [n for n in noise if n not in ends]

                def quick(exclude: list[str]) -> Path:   # calibrated on the ranking images only: cheap
                    return quantize_onnx(fp32, tmp / "ranking.onnx", "static", x, reduce_range=rr,
                                         prepared=prepared, calibrate_method=chosen["calibrate_method"],
                                         exclude=exclude)
                reference = logits(prepared, x)
                base_error = float(np.mean((logits(quick([]), x) - reference) ** 2))
                ranked = exclusion_ranking(candidates, x, quick, reference)
                record_["sensitivity"] = {
                    "seconds": round(time.perf_counter() - t0, 2), "images": len(x),
                    "method": "exclude one at a time: logits' mean squared error from fp32 (none in fp32: "
                              f"{base_error:.5g}); sqnr_db: what the node reads, before vs after its QDQ",
                    "error_none_fp32": base_error,
                    "ranking": [{"node": n, "error": round(v, 6), "sqnr_db": round(noise[n], 2)} for n, v in ranked]}
                log(f"per-layer ranking of {len(ranked)} quantized nodes (logits' error from fp32 {base_error:.4g} "
                    "with none in fp32); most helpful in fp32: "
                    + ", ".join(f"{n} ({v:.4g})" for n, v in ranked[:5]))
                cap = max(1, int(s.max_fp32_share * len(ranked)))
                for k in sorted({min(2 ** i, cap) for i in range(cap.bit_length() + 1)}):
                    if met or not ranked:
                        break
                    names = [n for n, _ in ranked[:k]]
                    met = attempt(f"{k} most sensitive node(s) in fp32 ({chosen['calibrate_method']}, "
                                  f"{chosen['images']} images)", exclude=names, **chosen)
                    record_["attempts"][-1]["exclude"] = names
        # 3. quantization-aware training, when allowed
        qat_dir = None
        if not met and s.qat_epochs and s.method == "static":
            if qat is None:
                raise GraftError("quantization-aware training is not available to this caller")
            qat_dir = qat(run_dir, epochs=s.qat_epochs, lr=s.qat_lr, calibration=s.calibration, seed=s.seed,
                          reduce_range=rr, max_drop=s.max_drop, baseline_val=base)
            q = json.loads((qat_dir / "export" / RESULT_FILE).read_text())
            chosen_attempt = next(a for a in q["attempts"] if a["attempt"] == q["chosen_attempt"])
            met = attempt(f"quantization-aware training, {s.qat_epochs} epoch(s) -> {qat_dir}",
                          path=Path(q["path"] or qat_dir / "export" / REJECTED),
                          val_int8=chosen_attempt["val_int8"])
            record_["attempts"][-1].update({"qat_run": str(qat_dir),
                                            "exclude": q.get("fp32_layers", [])})
        drop, path, chosen = best
        record_["chosen_attempt"] = chosen["attempt"]
        record_["fp32_layers"] = chosen.get("exclude", [])
        record_["fp32_ends"] = ends
        # every node that runs fp32: the ends, the chosen layers, and the Relu/Clip before them
        record_["fp32_nodes"] = (q.get("fp32_nodes", []) if chosen.get("qat_run") else
                                 with_activations(prepared, ends + record_["fp32_layers"]))
        record_["calibration"] = {"method": chosen.get("calibrate_method"), "images": chosen.get("images", 0)}
        record_["val"] = {"fp32": base, "int8": chosen["val_int8"], "drop": drop, "images": int(len(val.labels))}
        reason = None
        if not met:
            reason = (f"int8 loses {drop:.2f} points of validation accuracy at best (allowed {s.max_drop:g}) "
                      f"after {len(record_['attempts'])} attempts")
            reason += ("" if s.qat_epochs or s.method != "static"
                       else "; the next step is quantization-aware training: --qat-epochs N")
        if met and refuse:
            record_["latency"] = speeds(fp32, path)  # the QAT model too: against this run's fp32
            lat = record_["latency"]
            log(f"latency fp32 {lat['fp32']['b1_ms']:.2f} ms / int8 {lat['int8']['b1_ms']:.2f} ms at batch 1 "
                f"({lat['speedup_b1']:.2f}x), {lat['fp32']['b64_ms']:.1f} / {lat['int8']['b64_ms']:.1f} ms "
                f"at batch 64 ({lat['speedup_b64']:.2f}x)")
            if lat["speedup_b1"] <= s.min_speedup:
                kept = f", {len(record_['fp32_layers'])} layers kept fp32" if record_["fp32_layers"] else ""
                met, reason = False, (f"int8 meets the accuracy (drop {drop:.2f} points) but is not faster "
                                      f"than fp32 at batch 1 ({lat['speedup_b1']:.2f}x{kept})")
        accepted = met or not refuse
        if path.parent == tmp:   # a post-training attempt: out of the temporary folder before it goes
            final = out if accepted else out.with_name(REJECTED)
            os.replace(path, final)
        else:                    # the QAT run's own int8 file
            final = path if accepted or path.name == REJECTED else path.with_name(REJECTED)
            if final != path:
                os.replace(path, final)
        if not accepted:
            out.unlink(missing_ok=True)   # an earlier int8 file would pass for this decision's
    remove_stale_temps(out.parent)
    record_.update({"accepted": accepted, "met": met, "reason": reason,
                    "path": str(final) if accepted else None, "rejected_path": None if accepted else str(final),
                    "fp32_path": str(fp32), "size_bytes": final.stat().st_size,
                    "fp32_size_bytes": fp32.stat().st_size})
    # the test split, once, for the chosen model only (fp32 when int8 is refused)
    test = held_out_images(cfg, spec, "test")
    if test is not None:
        from .quantize import predictions
        labels = np.asarray(test.labels)
        a = predictions(fp32, test)
        record_["test"] = {"fp32": float((a == labels).mean()), "images": int(len(labels))}
        if accepted:
            b = predictions(final, test)
            record_["test"].update({"int8": float((b == labels).mean()), "agreement": float((a == b).mean())})
            record_["test"]["drop"] = _points(record_["test"]["fp32"], record_["test"]["int8"])
    else:
        record_["test"] = None
    record_["control_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out.parent / RESULT_FILE, record_)
    if record:
        record_int8(run_dir, record_)
    if accepted:
        t = record_["test"]
        log(f"int8 model {final}: validation {chosen['val_int8']:.4f} vs fp32 {base:.4f}"
            + (f"; test {t['int8']:.4f} vs fp32 {t['fp32']:.4f} on {t['images']} images" if t else "")
            + (f"; {len(record_['fp32_layers'])} layer(s) kept fp32" if record_["fp32_layers"] else "")
            + f"; decisions in {out.parent / RESULT_FILE}")
    else:
        log(f"[yellow]int8 refused, fp32 stays the model ({fp32}): {reason}; the best int8 try is "
            f"{final} (not for use); decisions in {out.parent / RESULT_FILE}[/]")
    return record_


def int8_summary(rec: dict) -> dict:
    """What a run's test_metrics.json carries about its int8 model, beside fp32's numbers."""
    t = rec.get("test") or {}
    lat = rec.get("latency") or {}
    return {"accepted": rec["accepted"], "model": rec["path"], "reason": rec["reason"],
            "max_drop": rec["max_drop"], "val_fp32": rec["val"]["fp32"], "val_int8": rec["val"]["int8"],
            "val_drop": rec["val"]["drop"], "test_fp32": t.get("fp32"), "test_int8": t.get("int8"),
            "test_drop": t.get("drop"), "test_images": t.get("images"), "fp32_layers": rec["fp32_layers"],
            "weights": rec["weights"], "calibration": rec["calibration"],
            "speedup_b1": lat.get("speedup_b1"), "speedup_b64": lat.get("speedup_b64"),
            "decisions": str(Path(rec["fp32_path"]).with_name(RESULT_FILE))}


_SECTION = re.compile(r"<!-- int8 -->.*?<!-- /int8 -->\n?", re.S)


def record_int8(run_dir: Path, rec: dict) -> None:
    """"int8" in the run's test_metrics.json, and an int8 section in its report.html (before the
    configuration), replacing an earlier one."""
    run_dir = Path(run_dir)
    summary = int8_summary(rec)
    metrics = run_dir / "test_metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        m["int8"] = summary
        atomic_write_json(metrics, m)
        from ..report.card import CARD_FILE, write_card
        if (run_dir / CARD_FILE).is_file():  # the card states the int8 model's numbers too
            write_card(run_dir)
    report = run_dir / "report.html"
    if not report.is_file():
        return
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    rows = [("verdict", "int8 accepted" if rec["accepted"] else f"refused, fp32 kept: {rec['reason']}"),
            ("validation accuracy fp32 / int8", f"{fmt(summary['val_fp32'])} / {fmt(summary['val_int8'])} "
                                               f"(drop {summary['val_drop']:.2f} points, allowed {rec['max_drop']:g})"),
            ("test accuracy fp32 / int8", f"{fmt(summary['test_fp32'])} / {fmt(summary['test_int8'])}"),
            ("speed-up at batch 1 / 64", f"{fmt(summary['speedup_b1'])} / {fmt(summary['speedup_b64'])}"),
            ("weights", rec["weights"]), ("calibration", f"{rec['calibration']['method']}, "
                                                          f"{rec['calibration']['images']} images"),
            ("layers kept fp32", ", ".join(rec.get("fp32_nodes") or rec["fp32_ends"] + rec["fp32_layers"]) or "none"),
            ("attempts", "; ".join(f"{a['change']}: drop {a['drop']:.2f}" for a in rec["attempts"]))]
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
    section = (f'<!-- int8 --><h2>int8 model (ONNX Runtime)</h2><div class="scroll"><table class="text">'
               f"<tbody>{body}</tbody></table></div><!-- /int8 -->\n")
    page = _SECTION.sub("", report.read_text())
    at = page.find("<h2>Configuration</h2>")
    at = at if at >= 0 else page.find("\n</main>")
    if at < 0:
        return
    atomic_write_text(report, page[:at] + section + page[at:])
