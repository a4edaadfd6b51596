"""Augmentation presets, by name.

`paper` is the source paper's Keras ImageDataGenerator policy (rotation 15°, width/height shift 0.1,
zoom 0.2, horizontal flip, edges filled with the nearest pixel). torchvision's RandomAffine draws
one set of parameters per call, which costs milliseconds per image in Python; here each image of a
batch gets its own affine matrix and one `grid_sample` warps the whole batch. Modern presets use
torchvision.transforms.v2 per image (RandAugment, TrivialAugment, random-resized-crop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..registry import Registry


@dataclass
class Augment:
    name: str
    per_image: Callable[[torch.Tensor], torch.Tensor] | None   # uint8 3xHxW -> uint8 3xHxW
    affine: bool                                                # paper policy on the float batch
    flip: bool
    generator: torch.Generator

    def reseed(self, seed: int) -> None:
        """Per epoch or per cached view: a resumed run draws the same augmentations again."""
        self.generator.manual_seed(seed)
        if self.per_image is not None:
            torch.manual_seed(seed)  # v2 transforms draw from the global generator

    def images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.per_image(im) for im in images] if self.per_image is not None else images

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        n, g = x.shape[0], self.generator
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        if self.flip:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(3), x)
        if not self.affine:
            return x
        angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(15)
        zoom = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.2            # Keras zoom_range=0.2
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.1 * 2        # 0.1 of the size, in [-1, 1] units
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x.contiguous(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@dataclass(frozen=True)
class Preset:
    """One augmentation policy: a per-image transform (built afresh for each Augment, since v2
    transforms and the crop cache hold state), the paper's affine warp per batch, a random flip."""
    per_image: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None
    affine: bool = False
    flip: bool = True


def _rrc():
    from torchvision.transforms import v2
    crops: dict[int, v2.RandomResizedCrop] = {}

    def rrc(im):  # crop to the image's own size; resizing happens per batch
        size = im.shape[-1]
        crop = crops.setdefault(size, v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True))
        return crop(im)
    return rrc


def _randaugment():
    from torchvision.transforms import v2
    return v2.RandAugment()


def _trivialaugment():
    from torchvision.transforms import v2
    return v2.TrivialAugmentWide()


# None: no augmentation at all (make_augment returns None, so callers skip the work entirely)
AUGMENTATIONS: Registry[Preset | None] = Registry("augmentation")
AUGMENTATIONS.add("none", None)
AUGMENTATIONS.add("flip", Preset())
AUGMENTATIONS.add("paper", Preset(affine=True))
AUGMENTATIONS.add("rrc", Preset(_rrc))
AUGMENTATIONS.add("randaugment", Preset(_randaugment))
AUGMENTATIONS.add("trivialaugment", Preset(_trivialaugment))
PRESETS = AUGMENTATIONS.names()   # the names, in registration order


def make_augment(name: str, seed: int = 0) -> Augment | None:
    preset = AUGMENTATIONS.get(name)
    if preset is None:
        return None
    return Augment(name, preset.per_image() if preset.per_image else None, affine=preset.affine,
                   flip=preset.flip, generator=torch.Generator().manual_seed(seed))
