"""`graft extend --keep-old-head`: the finished run's MLP keeps ranking its own classes, and a
prototype head (ridge, NCM) learns the new ones and which group a row belongs to (heads.GatedHead).

A prototype head refitted on all classes ranks the old classes by its own closed-form fit, not by
the SGD-trained MLP it replaces: on CIFAR-10 (5 classes, then the other 5; BENCHMARKS.md) the old
classes' test accuracy among the old outputs fell from 89.80% to 86.86% with the ridge alone. The
gated head keeps the MLP's ranking exactly, and its 10-class accuracy was higher too (81.94%
against 80.91%): the ridge's softmax summed over each group decides old or new about as well as the
ridge itself, and the MLP is the better judge within the old group.

The two inverse temperatures (the old MLP's, the prototype's) are fitted by the cross-entropy of
the merged head on validation rows of both groups: ridge scores regress one-hot targets (near 0..1)
and NCM's are cosines times |x|, neither a log-probability until scaled. Temperature scaling (Guo
et al. 2017) changes no ranking within either head. A bias between the groups, or the old MLP's
energy (logsumexp of its logits) as a second signal of "old", lowered the 10-class accuracy there
(by 0.2 points), so neither is fitted. Test rows are never read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..heads import GatedHead, gated_logits

GRID = torch.logspace(-3, 4, 15, dtype=torch.float64)   # prototype scales, half a decade apart, before LBFGS


def _merged(old: torch.Tensor, z: torch.Tensor, k: int, log_scales: torch.Tensor) -> torch.Tensor:
    """GatedHead's output on precomputed logits (float64 here; the head runs in float32)."""
    return gated_logits(old, z, k, log_scales.exp())


def calibrate(old: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse temperatures (old MLP's, prototype's) of least cross-entropy of the merged head on the
    rows (old: the MLP's logits, z: the prototype's over all classes, y: class ids, old ones < k)."""
    old, z = old.double(), z.double()
    # the prototype's scale varies by orders of magnitude between ridge and NCM: a grid finds its
    # basin, then LBFGS refines both scales (the loss is smooth in log-scale)
    losses = [F.cross_entropy(_merged(old, z, k, torch.stack([torch.zeros((), dtype=torch.float64), s.log()])), y)
              for s in GRID]
    start = GRID[int(torch.stack(losses).argmin())]
    log_scales = torch.tensor([0.0, float(start.log())], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scales], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(_merged(old, z, k, log_scales), y)
        loss.backward()
        return loss
    opt.step(closure)
    out = log_scales.detach().exp()
    return out if torch.isfinite(out).all() else torch.tensor([1.0, float(start)], dtype=torch.float64)


@torch.no_grad()
def gated_head(old_mlp: nn.Module, proto: nn.Module, old_classes: int, val_x: torch.Tensor,
               val_y: torch.Tensor) -> GatedHead:
    """The merged head, calibrated on validation rows `val_x`/`val_y` (class ids, the old ones first)."""
    have_old, have_new = bool((val_y < old_classes).any()), bool((val_y >= old_classes).any())
    if not (have_old and have_new):
        raise ConfigError("extend --keep-old-head: calibrating the gate needs validation images of the old "
                          "and the new classes, and there are none of the "
                          f"{'old' if not have_old else 'new'} ones (data.val_fraction > 0 keeps some); "
                          "or use --no-keep-old-head")
    head = GatedHead(old_mlp, proto, old_classes).eval()
    x = val_x.float()
    old, z = head.old(x), head.proto(x)   # no_grad: only the two scales are fitted
    with torch.enable_grad():
        scales = calibrate(old, z, val_y.long(), old_classes)
    head.scales.copy_(scales.float())
    return head
