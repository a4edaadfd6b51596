"""Quantization-aware training: the simulation matches ORT's int8 scheme and bakes cleanly."""
from __future__ import annotations

import json

import pytest
import torch

from graftnet import config
from graftnet.compress.qat import (WEIGHT_RANGE, FoldedWeightQuant, InputQuant, QatSettings, Simulation,
                                   _fold_factor, qat_run, quantized_convs)
from graftnet.errors import ConfigError
from graftnet.model import load_model
from graftnet.train.pipeline import train

from .conftest import make_folder, tiny_overrides


def _conv_bn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 5, 1), torch.nn.BatchNorm2d(5), torch.nn.Conv2d(5, 2, 1))
    for bn in (net[1], net[4]):
        bn.weight.data.uniform_(0.5, 2)
        bn.running_var.uniform_(0.1, 3)
    return net.eval()


def _on_grid(w: torch.Tensor, bn) -> bool:
    folded = w * _fold_factor(bn, w).view(-1, 1, 1, 1)
    steps = folded / (folded.abs().amax(dim=(1, 2, 3), keepdim=True) / WEIGHT_RANGE[1])
    return bool(torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= WEIGHT_RANGE[1] + 1e-3)


def test_pairs_each_conv_after_the_first_with_its_batchnorm():
    net = _conv_bn()
    assert quantized_convs(net) == [(net[3], net[4]), (net[5], None)]


def test_folded_weights_land_on_orts_grid_and_bake_cleanly():
    net = _conv_bn()
    keys = set(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    sim = Simulation(net, momentum=0.1)
    assert not _on_grid(net[3].parametrizations.weight.original, net[4])
    assert _on_grid(net[3].weight, net[4]) and _on_grid(net[5].weight, None)
    simulated = net(x)
    sim.bake()
    assert set(net.state_dict()) == keys and not net[3]._forward_pre_hooks  # nothing left behind
    assert _on_grid(net[3].weight, net[4])
    assert not torch.allclose(net(x), simulated)  # activations are no longer rounded


def test_input_quant_rounds_to_256_levels_and_tracks_the_range():
    hook, layer = InputQuant(momentum=0.5), torch.nn.Identity()
    x = torch.linspace(-1, 3, 5000)
    (y,) = hook(layer, (x,))
    assert len(torch.unique(y)) <= 256 and (y - x).abs().max() <= 4 / 255
    hook(layer, (x * 3,))  # training mode: the range moves halfway towards [-3, 9]
    assert hook.lo.item() == pytest.approx(-2) and hook.hi.item() == pytest.approx(6)
    layer.eval()
    hook(layer, (x * 100,))  # eval mode: the range stays
    assert hook.hi.item() == pytest.approx(6)


def test_gradients_pass_straight_through():
    conv, bn = torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3).eval()
    w = conv.weight.detach().clone().requires_grad_(True)
    FoldedWeightQuant(bn)(w).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_qat_run_end_to_end(tmp_path):
    data = make_folder(tmp_path / "data", n=12)
    run = train(config.resolve(None, tiny_overrides(data, tmp_path, **{"train.epochs": 2})))
    out = qat_run(run, QatSettings(epochs=1, lr=1e-3, calibration=8))
    report = json.loads((out / "qat.json").read_text())
    assert 0 <= report["int8_after_qat"] <= 1 and 0 <= report["fp32_after_qat"] <= 1
    assert (out / "export" / "model.int8.onnx").is_file()
    assert "int8 test accuracy (ONNX Runtime)" in (out / "report.html").read_text()  # not only fp32's
    model, _ = load_model(out)
    assert all(_on_grid(conv.weight, bn) for conv, bn in quantized_convs(model))
    with pytest.raises(ConfigError, match="epochs"):
        qat_run(run, QatSettings(epochs=0))
