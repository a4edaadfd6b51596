"""`graft export` and `graft quantize` (added to the CLI through cli.COMMAND_MODULES)."""
from __future__ import annotations

import json


def add_commands(sub) -> dict:
    p = sub.add_parser("export", help="export a run's model (ONNX or TorchScript) + preprocess.json")
    p.add_argument("run")
    p.add_argument("--format", default="onnx", help="onnx (default) or torchscript")
    p.add_argument("--out", help="output file (default RUN/export/model.onnx)")
    p = sub.add_parser("quantize", help="int8 ONNX model of a run (post-training, ONNX Runtime), with "
                       "its test accuracy beside fp32's")
    p.add_argument("run")
    p.add_argument("--method", default="static", choices=["static", "dynamic"],
                   help="static: whole model, calibrated on training images; dynamic: head only")
    p.add_argument("--calibration", type=int, default=256, metavar="N",
                   help="training images for static calibration (default 256)")
    p.add_argument("--out", help="output file (default RUN/export/model.int8.onnx)")
    p.add_argument("--qat-epochs", type=int, default=0, metavar="N",
                   help="quantization-aware training first: N epochs simulating int8, saved as a new "
                        "run RUN-qat holding export/model.int8.onnx (when post-training loses too much)")
    p.add_argument("--qat-lr", type=float, default=5e-5, help="learning rate of quantization-aware training")
    return {"export": cmd_export, "quantize": cmd_quantize}


def cmd_export(args) -> None:
    from .exporter import export_run
    print(json.dumps(export_run(args.run, args.format, args.out), indent=2))


def cmd_quantize(args) -> None:
    from .quantize import quantize_run
    if args.qat_epochs:
        from ..compress.qat import QatSettings, qat_run
        from ..errors import GraftError
        if args.method != "static" or args.out:
            raise GraftError("--qat-epochs makes a static int8 model inside the new run RUN-qat: "
                             "drop --method dynamic / --out")
        print(qat_run(args.run, QatSettings(args.qat_epochs, args.qat_lr, calibration=args.calibration)))
        return
    print(json.dumps(quantize_run(args.run, args.method, args.calibration, args.out), indent=2))
