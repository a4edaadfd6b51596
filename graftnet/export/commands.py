"""`graft export` and `graft quantize` (added to the CLI through cli.COMMAND_MODULES)."""
from __future__ import annotations

import json


def add_commands(sub) -> dict:
    p = sub.add_parser("export", help="export a run's model (ONNX or TorchScript) + preprocess.json")
    p.add_argument("run")
    p.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    p.add_argument("--out", help="output file (default RUN/export/model.onnx)")
    p = sub.add_parser("quantize", help="int8 ONNX model of a run (post-training, ONNX Runtime)")
    p.add_argument("run")
    p.add_argument("--method", default="static", choices=["static", "dynamic"],
                   help="static: whole model, calibrated on training images; dynamic: head only")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training images for static calibration (default 256)")
    p.add_argument("--out", help="output file (default RUN/export/model.int8.onnx)")
    return {"export": cmd_export, "quantize": cmd_quantize}


def cmd_export(args) -> None:
    from .exporter import export_run
    print(json.dumps(export_run(args.run, args.format, args.out), indent=2))


def cmd_quantize(args) -> None:
    from .quantize import quantize_run
    print(json.dumps(quantize_run(args.run, args.method, args.calibration, args.out), indent=2))
