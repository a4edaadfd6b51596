"""`graft export` and `graft quantize` (added to the CLI through cli.COMMAND_MODULES)."""
from __future__ import annotations

import argparse
import json
import math


def add_commands(sub) -> dict:
    p = sub.add_parser("export", help="export a run's model (ONNX or TorchScript) + preprocess.json")
    p.add_argument("run")
    p.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    p.add_argument("--out", help="output file (default RUN/export/model.onnx)")
    p = sub.add_parser("quantize", help="int8 ONNX model of a run (ONNX Runtime), checked on the validation "
                       "split: calibration and fp32 layers change until it keeps its accuracy, else fp32 stays")
    p.add_argument("run")
    p.add_argument("--max-drop", type=points, default=0.5, metavar="POINTS",
                   help="validation accuracy int8 may lose against fp32, in points (default 0.5); "
                        "beyond it: other calibration, the most sensitive layers in fp32, then QAT if "
                        "--qat-epochs allows, else a refusal that keeps fp32")
    p.add_argument("--method", default="static", choices=["static", "dynamic"],
                   help="static: whole model, calibrated on training images; dynamic: head only")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training images for static calibration (default 256; the last calibration "
                        "attempt uses 4x)")
    p.add_argument("--min-speedup", type=points, default=1.0, metavar="X",
                   help="int8 must be more than X times as fast as fp32 at batch 1 (default 1.0)")
    p.add_argument("--out", help="output file (default RUN/export/model.int8.onnx)")
    p.add_argument("--qat-epochs", type=int, default=0, metavar="N",
                   help="allow quantization-aware training when post-training int8 loses too much: N "
                        "epochs simulating int8, saved as a new run RUN-qat holding export/model.int8.onnx")
    p.add_argument("--qat-lr", type=float, default=5e-5, help="learning rate of quantization-aware training")
    return {"export": cmd_export, "quantize": cmd_quantize}


def points(text: str) -> float:
    """argparse type: a finite number >= 0 (points of accuracy, a ratio)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need a number >= 0")
    return value


def cmd_export(args) -> None:
    from .exporter import export_run
    print(json.dumps(export_run(args.run, args.format, args.out), indent=2))


def cmd_quantize(args) -> None:
    from ..errors import GraftError
    from ..compress.qat import qat_step
    from .control import ControlSettings, quantize_checked
    if args.qat_epochs and (args.method != "static" or args.out):
        raise GraftError("--qat-epochs makes a static int8 model inside the new run RUN-qat: "
                         "drop --method dynamic / --out")
    result = quantize_checked(args.run, ControlSettings(args.max_drop, args.method, args.calibration,
                                                        args.qat_epochs, args.qat_lr, args.min_speedup),
                              args.out, qat=qat_step)
    print(json.dumps({k: v for k, v in result.items() if k != "sensitivity"}, indent=2))
    if not result["accepted"]:
        raise GraftError(f"int8 refused, fp32 stays the model ({result['fp32_path']}): {result['reason']}")
