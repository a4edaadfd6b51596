"""One way to get class scores from a finished run, whether it is a single model or an ensemble.

A predictor takes *raw* images (uint8 CHW squares, as `data.images` keeps them) and does its own
preprocessing, because ensemble members may differ in backbone, input size, mean and std: there is
no one normalised tensor that suits them all. `predictor(images)` scores one batch (serving);
`predictor.logits(image_set)` scores a whole ImageSet in batches (evaluation, distillation).
Both return logits: softmax gives the class probabilities. An ensemble folder (`graft ensemble`)
loads here too, as an EnsemblePredictor over its members: building ensembles (ensemble.py) sits
above this module, and everything that scores a run (evaluate, serve, distill) sits on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import RunConfig, resolve
from .data.images import ImageSet, normalise, to_batch
from .errors import GraftError
from .model import GraftedModel, ModelSpec, load_model
from .features import autocast, compute_features


ENSEMBLE_FILE = "ensemble.json"   # marks a folder written by `graft ensemble`


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
    if (run_dir / ENSEMBLE_FILE).is_file():
        return load_ensemble(run_dir)
    return RunPredictor.load(run_dir)


def combine(member_logits: list[torch.Tensor], weights: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """log(sum_i w_i softmax(logits_i)), computed in log space (no underflow for confident members).
    Multi-label: each label on its own, the logit of sum_i w_i sigmoid(logits_i): sigmoid of the
    result is the members' weighted mean probability."""
    if multilabel:
        p = sum(w * l.float().sigmoid() for w, l in zip(weights.float(), member_logits))
        return torch.logit(p, eps=1e-7)
    logp = torch.stack([l.float().log_softmax(1) for l in member_logits])
    return torch.logsumexp(logp + weights.float().log().view(-1, 1, 1), 0)


class EnsemblePredictor:
    """Members (RunPredictors, or ensembles) with weights; scores raw images like a RunPredictor."""

    def __init__(self, members: list, weights: torch.Tensor, run_dir: Path | None = None,
                 cfg: RunConfig | None = None, thresholds: list[float] | None = None):
        """`thresholds`: a multi-label ensemble's, chosen on validation (default: the members' mean)."""
        check_classes(members)
        if len(weights) != len(members) or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-4:
            raise GraftError(f"ensemble weights {weights.tolist()}: need one non-negative weight per "
                             "member, summing to 1")
        self.members, self.weights, self.run_dir = members, weights.float(), run_dir
        self.cfg = cfg or members[0].cfg
        m0 = members[0].spec
        self.multilabel = m0.multilabel
        if m0.multilabel and not thresholds:
            thresholds = [round(sum(t) / len(t), 6) for t in zip(*(m.spec.thresholds or [0.5] * len(m0.classes)
                                                                   for m in members))]
        self.spec = ModelSpec(  # what the report and /info show; no model.json is written for it
            backbone="ensemble of " + " + ".join(f"{m.spec.backbone}@{m.image_size}" for m in members),
            timm_name="ensemble", weights_id="", classes=list(m0.classes), image_size=self.image_size,
            mean=m0.mean, std=m0.std, features="ensemble", multi_taps=0, feature_dim=len(members),
            multilabel=m0.multilabel, thresholds=list(thresholds or []))

    @property
    def classes(self) -> list[str]:
        return self.spec.classes

    @property
    def image_size(self) -> int:
        return max(m.image_size for m in self.members)  # each member shrinks to its own size

    def info(self) -> dict:
        members = [{**m.info(), "weight": round(float(w), 6)} for m, w in zip(self.members, self.weights)]
        return {"kind": "ensemble", "run": str(self.run_dir), "backbone": self.spec.backbone,
                "tta": all(m["tta"] for m in members), "image_size": self.image_size,
                "classes": self.classes, "members": members}

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        return combine([m(images) for m in self.members], self.weights, self.multilabel)

    def pixel_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return combine([m.pixel_logits(pixels) for m in self.members], self.weights.to(pixels.device), self.multilabel)

    def logits(self, images: ImageSet, batch_size: int = 128, description: str = "predict") -> torch.Tensor:
        return combine([m.logits(images, batch_size, description) for m in self.members], self.weights,
                       self.multilabel)


def check_classes(members: list) -> None:
    first = members[0]
    for m in members[1:]:
        if m.spec.multilabel != first.spec.multilabel:
            raise GraftError(f"{m.run_dir}: {'a multi-label' if m.spec.multilabel else 'a single-label'} run, "
                             f"{first.run_dir} is not; ensemble members must all be one or the other")
        if m.classes != first.classes:
            raise GraftError(f"{m.run_dir}: its classes {m.classes} differ from {first.run_dir}'s "
                             f"{first.classes}; ensemble members must share one class list, in order")


def load_ensemble(run_dir: str | Path) -> EnsemblePredictor:
    run_dir = Path(run_dir)
    try:
        spec = json.loads((run_dir / ENSEMBLE_FILE).read_text())
        paths = [_member_path(run_dir, m) for m in spec["members"]]
        weights = torch.tensor([float(m["weight"]) for m in spec["members"]])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise GraftError(f"{run_dir / ENSEMBLE_FILE}: not a valid ensemble file ({e})") from None
    ensemble = EnsemblePredictor([load_predictor(p) for p in paths], weights, run_dir,
                                 resolve(run_dir / "config.yaml"), spec.get("thresholds"))
    return flip_tta(ensemble) if spec.get("tta") else ensemble  # scored with mirrors: predicts so too


def _member_path(run_dir: Path, member: dict) -> Path:
    """Relative to the ensemble folder (survives moving runs/ as a whole), else the absolute path."""
    for p in (run_dir / member["path"], Path(member["absolute"])):
        if p.is_dir():
            return p
    raise GraftError(f"{run_dir / ENSEMBLE_FILE}: member run {member['path']} not found "
                     f"(nor {member['absolute']})")
