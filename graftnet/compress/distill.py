"""Knowledge distillation (Hinton et al. 2015): a student run trained on a teacher's soft predictions.

A distillation is `graft train` with one more callback: the teacher's term (teach.py) on the run's
loss. With the student's backbone frozen and no augmentation, both sides are fixed per image: the
student's pooled features come from the usual feature cache and the teacher's logits are computed
once and cached too, so the student's head trains in seconds. Any other student (augmented,
fine-tuned) learns with the teacher scoring each of its batches. alpha = 0 (`--no-teacher`) is plain
cross-entropy with the same budget: the baseline a distilled student has to beat. A transfer set
(`--transfer`: unlabeled images, or the rest of a data set the run only sliced) adds images the
teacher labels: they count in the soft term only, and are where a teacher helps most (Hinton et al.
distilled on such sets). Stages, checkpoints, `--resume` and the report are the pipeline's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from .. import config as config_mod
from ..backbones import get_spec
from ..config import RunConfig
from ..data.labels import open_data
from ..errors import ConfigError, DataError, GraftError
from ..io import atomic_write_json, atomic_write_text, cache_root
from ..progress import log
from ..run import RunResult
from ..train.loop import Callback, State
from ..train.pipeline import train
from .teach import (CachedTeacher, RunTeacher, Teacher, TeacherInLoop, kd_loss, loss_card,  # noqa: F401
                    teacher_logits)

SETTINGS_FILE = "distill.yaml"


@dataclass
class DistillSettings:
    teacher: str | None = None     # teacher run folder (None with alpha 0: the no-teacher baseline)
    temperature: float = 4.0
    alpha: float = 0.7             # weight of the soft (teacher) term
    transfer: str | None = None    # unlabeled images (folder or zip; labels ignored) that the teacher
                                   # labels for the student: the soft term only (Hinton's transfer set)
    transfer_max: int | None = None  # at most this many of them (a seeded random choice)

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"distill temperature {self.temperature}: must be positive")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill alpha {self.alpha}: must be in [0, 1]")
        if self.alpha > 0 and not self.teacher:
            raise ConfigError("distill: alpha > 0 needs a teacher run (or alpha 0 / --no-teacher)")
        if self.transfer and self.alpha == 0:
            raise ConfigError("distill: a transfer set is labeled by the teacher; it needs alpha > 0")
        if self.transfer_max is not None and self.transfer_max < 1:
            raise ConfigError(f"distill transfer_max {self.transfer_max}: must be at least 1")


def needs_teacher_in_loop(cfg: RunConfig) -> bool:
    """Does the student see other inputs than one cached feature vector per image (augmentation,
    MixUp/CutMix, flipped views, a fine-tuned backbone, or no feature cache at all)?"""
    t = cfg.train
    return (t.augment != "none" or bool(t.mixup or t.cutmix or t.cache_views or t.flip_views)
            or cfg.finetune.epochs > 0 or not t.cache_features)


class DistillRecord(Callback):
    """What a distillation run keeps besides a run's files: its settings (distill.yaml, read by
    --resume), the report's teacher lines, and distill.json with teacher and student accuracy."""
    key = "distill"

    def __init__(self, s: DistillSettings, teacher: Teacher | None, term: Callback | None, in_loop: bool):
        self.s, self.teacher, self.term, self.in_loop = s, teacher, term, in_loop
        self.teacher_acc: float | None = None

    def before_fit(self, state: State) -> None:
        path = state.run_dir / SETTINGS_FILE
        if not path.is_file():
            atomic_write_text(path, yaml.safe_dump({"distill": asdict(self.s)}, sort_keys=False))

    def report_cards(self, job) -> dict:
        s, test = self.s, job.sets["test"]
        cards = {"teacher": s.teacher or "none (hard labels only)",
                 **({"distillation": "teacher in the loop"} if self.in_loop else {}), **loss_card(s.alpha, s.temperature)}
        if self.teacher is not None and len(test):
            cache = cache_root(job.cfg.cache_dir) if job.cfg.train.cache_features else None
            # the cached path decoded the splits at the teacher's size already; in the loop the
            # teacher resizes the student's images itself
            logits, _ = teacher_logits(self.teacher, (getattr(self.term, "sets", None) or job.sets)["test"],
                                       job.source.fingerprint, cache)
            self.teacher_acc = (logits.argmax(1) == test.labels).float().mean().item()
            cards["teacher test accuracy"] = f"{self.teacher_acc:.4f}"
        if self.n_transfer:
            cards["transfer images"] = f"{self.n_transfer:,} unlabeled"
        self.labeled = len(job.sets["train"])
        return cards

    @property
    def n_transfer(self) -> int:
        return getattr(self.term, "n_transfer", 0)

    def after_run(self, job, metrics: dict) -> None:
        atomic_write_json(job.run_dir / "distill.json", {
            **asdict(self.s), **({"mode": "teacher in the loop"} if self.in_loop else {}),
            "teacher_test_acc": self.teacher_acc, "student_test_acc": metrics["accuracy"],
            "labeled_images": self.labeled, "transfer_images": self.n_transfer})


def distill(cfg: RunConfig | None, settings: DistillSettings | None, teacher: Teacher | None = None,
            resume: str | Path | None = None) -> RunResult:
    """Train a student run from `cfg`, taught by `teacher` (or settings.teacher), or continue the
    killed distillation `resume`; returns the run. A student that sees each image one way (frozen,
    cached features, no augmentation) trains on cached teacher logits; any other with the teacher
    in the loop."""
    if resume:
        cfg, settings = _resume_point(Path(resume))
    settings.check()
    in_loop = needs_teacher_in_loop(cfg)
    if in_loop:
        cfg = _in_loop_config(cfg, settings)
    if teacher is None and settings.alpha > 0:
        teacher = RunTeacher(settings.teacher)
    term = None
    if teacher is not None:
        source = open_data(cfg.data, cfg.cache_dir)
        if source.multilabel:
            raise DataError(f"{cfg.data.labels}: multi-label data; distillation's soft targets are a "
                            "softmax over one class per image")
        classes = source.classes
        if list(teacher.classes) != list(classes):
            raise DataError(f"the teacher's classes {teacher.classes} differ from the data's {classes}")
        spec = get_spec(cfg.backbone.name)
        term = TeacherInLoop(teacher, spec.mean, spec.std, settings.temperature, settings.alpha) if in_loop else \
            CachedTeacher(teacher, settings.temperature, settings.alpha, settings.transfer, settings.transfer_max)
    log(f"distillation: teacher {settings.teacher or 'none'}, T {settings.temperature}, alpha {settings.alpha}"
        + (", teacher in the loop" if in_loop else ", cached teacher logits"))
    callbacks = [*([term] if term else []), DistillRecord(settings, teacher, term, in_loop)]
    return train(None, resume=resume, callbacks=callbacks) if resume else train(cfg, callbacks=callbacks)


def _in_loop_config(cfg: RunConfig, s: DistillSettings) -> RunConfig:
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
    return cfg


def _resume_point(run_dir: Path) -> tuple[RunConfig, DistillSettings]:
    try:
        settings = DistillSettings(**yaml.safe_load((run_dir / SETTINGS_FILE).read_text())["distill"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise GraftError(f"{run_dir}: not a distillation run folder ({SETTINGS_FILE}: {e})") from None
    if (run_dir / "distill.json").is_file():
        raise GraftError(f"{run_dir}: this distillation finished already (distill.json exists)")
    return config_mod.resolve(run_dir / "config.yaml"), settings
