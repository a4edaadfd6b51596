"""Quantization-aware training (QAT): fine-tune a run while its forward pass simulates the int8 model
ONNX Runtime will build from it, then quantize it as usual.

Post-training quantization (export/quantize.py) rounds weights that were never trained to live on
an int8 grid. When that costs too much accuracy, QAT lets the network adapt first. It simulates
what quantize_onnx does to every convolution after the first (the first one and the head stay fp32):
- weights: ORT folds each BatchNorm into the convolution before it, then quantizes the folded
  weight per output channel, symmetric, on the range the CPU's weight format uses: 8-bit [-127, 127]
  where VNNI/AMX multiply without saturating, else 7-bit [-64, 64] (reduce_range; quantize.py says
  why). The fake quantization here acts on that folded weight and maps the result back
  through the BatchNorm, so training sees ORT's grid. BatchNorm statistics stay fixed (eval mode),
  as folding assumes.
- activations: the input of each quantized convolution is rounded to uint8 over a range that
  follows the batches' minima and maxima (a moving average; ORT calibrates with MinMax), zero
  always inside it.
Rounding passes gradients straight through (torch.fake_quantize_*). After training the weights are
baked onto the grid (so ORT's own rounding of them is exact), the model is saved as a new run, and
the accuracy control of `graft quantize` (export/control.py) turns that run into
export/model.int8.onnx: the same calibration steps and sensitive layers as post-training, its
attempts in the new run's export/quantize.json. It measures the drop against `baseline_val` when
given (`graft quantize --qat-epochs` passes the source run's fp32 validation accuracy) and keeps the
best int8 file either way: whether int8 is used is the caller's decision.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..evaluation import finish_evaluation
from ..export.quantize import weight_reduce_range
from ..io import atomic_write_json
from ..model import save_model
from ..progress import log
from ..run import create_run, run_scope, write_history
from ..train.loop import State
from .prune import Recovery, Run, finetune

# ORT's symmetric int8 weight ranges (quant_utils.ONNX_INT_TYPE_REDUCED_RANGE / _SYMMETRIC_RANGE)
WEIGHT_RANGES = {True: (-64, 64), False: (-127, 127)}   # by reduce_range
WEIGHT_RANGE = WEIGHT_RANGES[weight_reduce_range()]     # this CPU's, as quantize_onnx chooses it
ACTIVATION_RANGE = (0, 255)


@dataclass
class QatSettings:
    epochs: int = 1
    lr: float = 5e-5               # a small rate: the network only has to adapt to the rounding
    batch_size: int | None = None  # None: the run's train.batch_size
    momentum: float = 0.01         # of the activation ranges' moving average
    calibration: int = 256         # training images that calibrate the final int8 model (as PTQ)
    seed: int = 0
    reduce_range: bool | None = None   # the weights' grid; None: by the CPU (quantize.weight_reduce_range)
    max_drop: float = 0.5          # the accuracy control's allowed drop, validation points
    baseline_val: float | None = None  # fp32 validation accuracy the drop is measured against

    def check(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or not 0 < self.momentum <= 1 or self.calibration < 1:
            raise ConfigError("qat: epochs >= 1, lr > 0, momentum in (0, 1] and calibration >= 1 image")


def _fold_factor(bn: nn.Module | None, like: torch.Tensor) -> torch.Tensor:
    """gamma / sqrt(var + eps) per output channel (ones without a BatchNorm); never exactly zero."""
    if bn is None:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    f = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    return torch.where(f.abs() < 1e-8, torch.full_like(f, 1e-8), f)


class FoldedWeightQuant(nn.Module):
    """Parametrization of a conv weight W: fake-quantize the folded W * f per channel, return it / f."""

    def __init__(self, bn: nn.Module | None, weight_range: tuple[int, int] = WEIGHT_RANGE):
        super().__init__()
        self.bn = [bn]  # in a list: not a submodule, so the model's state_dict keeps its own keys
        self.range = weight_range

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        f = _fold_factor(self.bn[0], w).view(-1, *([1] * (w.dim() - 1)))
        folded = w * f
        scale = (folded.detach().abs().amax(dim=tuple(range(1, w.dim()))) / self.range[1]).clamp_min(1e-12)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        q = torch.fake_quantize_per_channel_affine(folded, scale.float(), zero, 0, *self.range)
        return q / f


class InputQuant:
    """Forward pre-hook: rounds a layer's input to uint8 over a tracked [min, max] range (0 inside)."""

    def __init__(self, momentum: float):
        self.momentum, self.lo, self.hi = momentum, None, None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if module.training or self.lo is None:
            lo, hi = x.detach().min().clamp(max=0).float(), x.detach().max().clamp(min=0).float()
            if self.lo is None:
                self.lo, self.hi = lo, hi
            else:
                self.lo = self.lo + self.momentum * (lo - self.lo)
                self.hi = self.hi + self.momentum * (hi - self.hi)
        scale = ((self.hi - self.lo) / ACTIVATION_RANGE[1]).clamp_min(1e-8)
        zero = (-self.lo / scale).round().clamp(*ACTIVATION_RANGE).to(torch.int32)
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, *ACTIVATION_RANGE),) + tuple(args[1:])


def quantized_convs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.Module | None]]:
    """(conv, the BatchNorm ORT folds into it or None) for every convolution after the first, in
    module order; a BatchNorm counts when it is the very next module and matches the channels."""
    modules = list(model.modules())
    convs = []
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            bn = nxt if (isinstance(nxt, nn.modules.batchnorm._BatchNorm)
                         and nxt.num_features == m.out_channels) else None
            convs.append((m, bn))
    return convs[1:]


class Simulation:
    """Installs the simulation on a model; bake() puts the weights on the grid and removes it all."""

    def __init__(self, model: nn.Module, momentum: float, weight_range: tuple[int, int] = WEIGHT_RANGE):
        self.convs = quantized_convs(model)
        self.hooks = []
        for conv, bn in self.convs:
            parametrize.register_parametrization(conv, "weight", FoldedWeightQuant(bn, weight_range))
            self.hooks.append(conv.register_forward_pre_hook(InputQuant(momentum)))

    def bake(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for conv, _ in self.convs:
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)


def qat_step(run_dir: str | Path, epochs: int, lr: float, **settings) -> Path:
    """The accuracy control's last step (export/control.py `quantize_checked(qat=...)`)."""
    return qat_run(run_dir, QatSettings(epochs, lr, **settings))


def qat_run(run_dir: str | Path, settings: QatSettings, out: str | None = None, name: str | None = None) -> Path:
    """QAT of the run in `run_dir` into a new run folder holding the fp32 weights (on the int8 grid)
    and export/model.int8.onnx; qat.json records the settings and the accuracies. Returns the folder."""
    from ..export.control import ControlSettings, quantize_checked, record_int8
    settings.check()
    run, s = Run(run_dir), settings
    model, spec = run.model, run.spec
    new_dir = create_run(out or run.dir.parent, name or f"{run.dir.name}-qat", spec.backbone, run.cfg, s.seed)
    with run_scope(new_dir):
        before = run.accuracy(model)
        log(f"quantization-aware training of {run.dir}: test accuracy {before:.4f} (fp32); "
            f"{len(quantized_convs(model))} convolutions simulated in int8, {s.epochs} epoch(s) at lr {s.lr:g}")
        torch.manual_seed(s.seed)
        reduce_range = weight_reduce_range() if s.reduce_range is None else s.reduce_range
        sim = Simulation(model, s.momentum, WEIGHT_RANGES[reduce_range])
        state = State()
        # whole batches: each forward moves the activation ranges' average (InputQuant), so chunks
        # would change what the simulation learns
        finetune(run, model, Recovery(s.epochs, s.lr, s.batch_size or run.cfg.train.batch_size, chunked=False),
                 state, [], torch.Generator().manual_seed(s.seed))
        sim.bake()
        for p in model.parameters():
            p.requires_grad_(False)
        save_model(model, spec, new_dir)
        write_history(new_dir, state.history)
        # the accuracy control, as `graft quantize`: it also scores int8 on this run's test split
        q = quantize_checked(new_dir, ControlSettings(s.max_drop, calibration=s.calibration, seed=s.seed,
                                                      reduce_range=reduce_range),
                             baseline_val=s.baseline_val, refuse=False, record=False)
        int8 = q["test"]["int8"] if q["test"] else float("nan")
        m = finish_evaluation(new_dir, run.cfg, spec, state.history, run.logits(model),
                              run.sets["test"].labels, run.sets["test"], run.sets["train"],
                              cards={"int8 test accuracy (ONNX Runtime)": f"{int8:.4f}",
                                     "fp32 before QAT": f"{before:.4f}"})
        report = {"source_run": str(run.dir), "settings": asdict(s), "fp32_before": before,
                  "fp32_after_qat": m["accuracy"], "int8_after_qat": int8, "int8_model": q["path"],
                  "size_bytes": q["size_bytes"], "int8_val_drop": q["val"]["drop"],
                  "int8_meets_max_drop": q["met"], "fp32_layers": q["fp32_layers"]}
        atomic_write_json(new_dir / "qat.json", report)
        record_int8(new_dir, q)   # after finish_evaluation, which rewrote test_metrics.json
        log(f"QAT: test accuracy fp32 {before:.4f} -> QAT weights in fp32 {m['accuracy']:.4f}, "
            f"int8 (ONNX Runtime) {int8:.4f}; {q['path']}")
    return new_dir
