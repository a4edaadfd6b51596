"""Deployment: export a run to ONNX / TorchScript, run it with ONNX Runtime, quantize it to int8.

    exporter.py   torch -> model.onnx + preprocess.json, checked against PyTorch on real images
    runtime.py    ONNX Runtime + PIL + numpy only: predict, evaluate (accuracy), measure latency
    quantize.py   int8 post-training quantization (static, calibrated on training images; dynamic)
    commands.py   `graft export`, `graft quantize`

Quantization lives here rather than in compress/ because its int8 graph only exists as an ONNX
Runtime model: it is a deployment format, not a smaller PyTorch model.
"""
