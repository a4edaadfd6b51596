"""Distillation with the teacher in the training loop: for students that see a new input every time.

The cached path (distill.py) scores each training image once, which is only right when the student
sees each image the same way every epoch. A student trained with augmentation, MixUp/CutMix or a
fine-tuned backbone sees a different input every batch; Hinton-style distillation wants the
teacher's soft targets for that very input. So here the teacher scores every batch: after the
loop computes the student's hard loss, `TeacherInLoop.after_loss` undoes the student's
normalisation, lets the teacher (a run or an ensemble) resize and normalise the pixels its own way,
and mixes the two terms:

    loss = alpha * T² * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * hard loss

The hard loss is the run's own (label smoothing, class weights, mixed targets). Everything else is
`graft train`'s pipeline: stages, fine-tuning groups, checkpoints, `--resume`, the report.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ..backbones import get_spec
from ..config import RunConfig
from ..data.sources import open_source
from ..errors import ConfigError, DataError, GraftError
from ..io import atomic_write_json, atomic_write_text
from ..progress import log
from ..train.loop import Callback, State

SETTINGS_FILE = "distill.yaml"


def needs_teacher_in_loop(cfg: RunConfig) -> bool:
    """Does the student see other inputs than one cached feature vector per image (augmentation,
    MixUp/CutMix, flipped views, a fine-tuned backbone, or no feature cache at all)?"""
    t = cfg.train
    return (t.augment != "none" or bool(t.mixup or t.cutmix or t.cache_views or t.flip_views)
            or cfg.finetune.epochs > 0 or not t.cache_features)


class TeacherInLoop(Callback):
    """The distillation term on every training batch, the teacher scoring the student's own inputs."""

    def __init__(self, teacher, student_mean, student_std, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.mean = torch.tensor(student_mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(student_std).view(1, 3, 1, 1) * 255

    def after_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        x, _, logits = state.batch
        if x.dim() != 4:
            raise GraftError("distillation with the teacher in the loop needs image batches, but this "
                             "stage trains on cached features (train.cache_features must be false)")
        pixels = x.float() * self.std.to(x.device) + self.mean.to(x.device)  # back to 0..255
        target = self.teacher.pixel_logits(pixels).float().to(logits.device)
        t = self.temperature
        return self.alpha * t * t * soft_term(logits.float(), target, t) + (1 - self.alpha) * loss


def soft_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    log_target=True, reduction="batchmean")


def distill_in_loop(cfg: RunConfig, s, teacher, resume: Path | None = None) -> Path:
    """Train (or resume) a student run with `graft train`'s pipeline and the teacher in the loop."""
    from ..train.pipeline import train
    if s.transfer:
        raise ConfigError("distill: a transfer set works with the cached path only (a frozen student "
                          "without augmentation or fine-tuning)")
    if cfg.train.cache_views:
        raise ConfigError("distill: cached views hold the student's features of augmented images the "
                          "teacher never sees: use --cache-views 0 (augmentation on the fly)")
    if cfg.train.cache_features:
        log("distill: the teacher scores every augmented or fine-tuned batch, so stage 1 runs the "
            "backbone on images too (train.cache_features off)")
        cfg = replace(cfg, train=replace(cfg.train, cache_features=False))
    spec = get_spec(cfg.backbone.name)
    callbacks, info = [], {}
    if teacher is not None:
        classes = open_source(cfg.data.path, cfg.cache_dir).classes
        if list(teacher.classes) != list(classes):
            raise DataError(f"the teacher's classes {teacher.classes} differ from the data's {classes}")
        callbacks.append(TeacherInLoop(teacher, spec.mean, spec.std, s.temperature, s.alpha))

    def cards(sets) -> dict:
        out = {"teacher": s.teacher or "none (hard labels only)", "distillation": "teacher in the loop",
               **loss_card(s.alpha, s.temperature)}
        if teacher is not None and len(sets["test"]):
            info["teacher_test_acc"] = (teacher(sets["test"]).argmax(1) == sets["test"].labels).float().mean().item()
            out["teacher test accuracy"] = f"{info['teacher_test_acc']:.4f}"
        info["labeled_images"] = len(sets["train"])
        return out
    if resume:
        run_dir = train(None, resume=resume, callbacks=callbacks, cards=cards)
    else:
        run_dir = train(cfg, callbacks=callbacks, cards=cards, on_start=lambda d: _save_settings(d, s))
    m = json.loads((run_dir / "test_metrics.json").read_text())
    atomic_write_json(run_dir / "distill.json", {**asdict(s), "mode": "teacher in the loop",
                                                 "teacher_test_acc": info.get("teacher_test_acc"),
                                                 "student_test_acc": m.get("accuracy"),
                                                 "labeled_images": info.get("labeled_images"), "transfer_images": 0})
    return run_dir


def loss_card(alpha: float, temperature: float) -> dict:
    """The report's note on the training curve: with a teacher it is not the validation's loss."""
    if not alpha:
        return {}
    return {"training loss": f"{alpha:g}·T²·KL + {1 - alpha:g}·CE at T {temperature:g}: "
                             "not comparable with the validation cross-entropy"}


def _save_settings(run_dir: Path, s) -> None:
    atomic_write_text(run_dir / SETTINGS_FILE, yaml.safe_dump({"distill": asdict(s)}, sort_keys=False))
