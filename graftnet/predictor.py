"""One way to get class scores from a finished run, whether it is a single model or an ensemble.

A predictor takes *raw* images (uint8 CHW squares, as `data.images` keeps them) and does its own
preprocessing, because ensemble members may differ in backbone, input size, mean and std: there is
no one normalised tensor that suits them all. `predictor(images)` scores one batch (serving);
`predictor.logits(image_set)` scores a whole ImageSet in batches (evaluation, distillation).
Both return logits: softmax gives the class probabilities.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig, resolve
from .data.images import ImageSet, normalise, to_batch
from .model import GraftedModel, ModelSpec, load_model
from .train.features import autocast, compute_features


class RunPredictor:
    """A single trained run: its model, the spec that says how to preprocess, its config."""

    def __init__(self, run_dir: Path, model: GraftedModel, spec: ModelSpec, cfg: RunConfig):
        self.run_dir, self.model, self.spec, self.cfg = run_dir, model, spec, cfg
        # flip_views runs score the image and its mirror and average the logits, as in training
        self.views = [False, True] if cfg.train.flip_views else [False]

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunPredictor":
        run_dir = Path(run_dir)
        model, spec = load_model(run_dir)
        return cls(run_dir, model, spec, resolve(run_dir / "config.yaml"))

    @property
    def classes(self) -> list[str]:
        return self.spec.classes

    @property
    def image_size(self) -> int:
        """The size images are kept at before this predictor resizes them (its input size)."""
        return self.spec.image_size

    def info(self) -> dict:
        return {"kind": "run", "run": str(self.run_dir), "backbone": self.spec.backbone,
                "image_size": self.spec.image_size, "classes": self.classes, "tta": len(self.views) > 1}

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        s = self.spec
        return self._forward(to_batch(images, s.image_size, s.mean, s.std, self.cfg.backbone.channels_last))

    @torch.no_grad()
    def pixel_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of a float pixel batch (0..255, N x 3 x H x W) on its own device: a teacher in a
        training loop scores the student's augmented batch, de-normalised, without a trip to uint8."""
        s = self.spec
        self.model.to(pixels.device)
        return self._forward(normalise(pixels, s.image_size, s.mean, s.std, self.cfg.backbone.channels_last))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for flip in self.views:
            with autocast(self.cfg.backbone.precision, x.device.type):
                f = self.model.features(x.flip(3) if flip else x)
            out.append(self.model.mlp(f.float()))
        return sum(out) / len(out)

    @torch.no_grad()
    def logits(self, images: ImageSet, batch_size: int = 128, description: str = "predict") -> torch.Tensor:
        s, b = self.spec, self.cfg.backbone
        out = [self.model.mlp(compute_features(self.model, images, s.image_size, s.mean, s.std, batch_size,
                                               b.precision, b.channels_last, flip=flip,
                                               description=f"{description}: {self.run_dir.name}",
                                               micro_batch=self.cfg.train.micro_batch).float())
               for flip in self.views]
        return sum(out) / len(out)


def flip_tta(predictor):
    """Test-time augmentation: score each image and its mirror and average the logits, as runs
    trained with flip_views always do. An ensemble passes it on to every member. Returns the
    predictor."""
    members = getattr(predictor, "members", None)
    if members is None:
        predictor.views = [False, True]
    else:
        for m in members:
            flip_tta(m)
    return predictor


def load_predictor(run_dir: str | Path):
    """A RunPredictor, or an EnsemblePredictor for a folder written by `graft ensemble`."""
    run_dir = Path(run_dir)
    from .ensemble import ENSEMBLE_FILE, load_ensemble
    if (run_dir / ENSEMBLE_FILE).is_file():
        return load_ensemble(run_dir)
    return RunPredictor.load(run_dir)
