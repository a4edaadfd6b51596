"""Teachers and the distillation term, as callbacks on `graft train`'s loop.

    loss = alpha * T² * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * hard loss

T² keeps the soft term's gradients on the scale of the hard term's as T grows. The hard loss is the
run's own (label smoothing, class weights, mixed targets; unlabeled transfer rows left out). Where
the teacher's logits come from depends on what the student sees:

- `CachedTeacher`: a frozen student on cached features without augmentation sees each image the
  same way every epoch, so the teacher scores each training image once (cached on disk too); the
  logits ride with their rows through the loop as per-row targets, and a transfer set (unlabeled
  images the teacher labels) adds rows. The head then trains in seconds.
- `TeacherInLoop`: a student that sees a new input every time (augmentation, MixUp/CutMix, a
  fine-tuned backbone) gets the teacher's soft targets for that very input: the teacher scores
  every batch's pixels (the student's normalisation undone, the teacher's own applied).

A teacher is anything with `identity`, `image_size`, `classes`, `__call__(ImageSet) -> logits` and
`pixel_logits(batch) -> logits` (RunTeacher: a finished run folder or a `graft ensemble` folder).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data.images import ImageSet
from ..errors import DataError, GraftError
from ..io import cache_root, save_tensors
from ..predictor import load_predictor
from ..progress import log
from ..features import cache_key
from ..train.inputs import load_data, split_features
from ..train.loop import Callback, State, hard_loss


class Teacher(Protocol):
    identity: str       # changes whenever the teacher's logits could change (weights, preprocessing)
    image_size: int     # the input size it wants its images decoded at
    classes: list[str]

    def __call__(self, images: ImageSet) -> torch.Tensor: ...

    def pixel_logits(self, pixels: torch.Tensor) -> torch.Tensor: ...


class RunTeacher:
    """A finished run, or an ensemble folder (`graft ensemble`), as teacher: its logits the way
    `graft evaluate` computes them."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise GraftError(f"{self.dir}: teacher run folder not found")
        self.predictor = load_predictor(self.dir)
        from ..model import single_label_only
        single_label_only(self.predictor.spec, self.dir, "distillation teaches with the softmax of a "
                          "teacher that gives one class per image")
        self.spec, self.cfg = self.predictor.spec, self.predictor.cfg
        self.image_size, self.classes = self.predictor.image_size, self.predictor.classes
        self.identity = _identity(self.predictor)

    def __call__(self, images: ImageSet) -> torch.Tensor:
        return self.predictor.logits(images, self.cfg.train.eval_batch_size, "teacher")

    def pixel_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """One training batch's logits (teacher in the loop)."""
        return self.predictor.pixel_logits(pixels)


def _identity(predictor) -> str:
    """A hash of everything that makes the teacher's logits: each member's weights and spec, the
    ensemble weights, flip averaging."""
    h = hashlib.sha256()
    for m, w in zip(getattr(predictor, "members", [predictor]), getattr(predictor, "weights", [1.0])):
        if not hasattr(m, "run_dir") or hasattr(m, "members"):
            h.update(_identity(m).encode())
        else:
            h.update((m.run_dir / "model.json").read_bytes())
            h.update((m.run_dir / "model.safetensors").read_bytes())
            h.update(repr(m.cfg.train.flip_views).encode())
        h.update(repr(float(w)).encode())
    return h.hexdigest()[:24]


def teacher_logits(teacher: Teacher, images: ImageSet, fingerprint: str, cache_dir: Path | None
                   ) -> tuple[torch.Tensor, bool]:
    """The teacher's logits for these images, from the cache when present. Returns (logits, hit)."""
    if cache_dir is None:
        return teacher(images), False
    path = Path(cache_dir) / "teacher_logits" / f"{cache_key({'teacher': teacher.identity}, images, fingerprint)}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file
        try:
            logits = load_file(str(path))["logits"]
            if logits.shape == (len(images), len(teacher.classes)):
                return logits, True
        except Exception:  # a damaged entry is recomputed, never trusted
            pass
    logits = teacher(images).float()
    try:
        save_tensors(path, {"logits": logits})
    except OSError as e:
        log(f"[yellow]teacher logits not cached ({e}); distillation goes on[/]")
    return logits, False


def soft_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    log_target=True, reduction="batchmean")


def mix(hard: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
        alpha: float) -> torch.Tensor:
    """alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * the hard loss."""
    return alpha * temperature ** 2 * soft_term(student, teacher, temperature) + (1 - alpha) * hard


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, temperature: float,
            alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The whole distillation loss of one batch, as the loop computes it with a teacher callback;
    rows labeled -1 (unlabeled transfer images) count in the soft term only."""
    hard = hard_loss(None, label_smoothing)(student, labels)
    if alpha == 0 or teacher is None:
        return hard
    return mix(hard, student, teacher, temperature, alpha)


def loss_card(alpha: float, temperature: float) -> dict:
    """The report's note on the training curve: with a teacher it is not the validation's loss."""
    if not alpha:
        return {}
    return {"training loss": f"{alpha:g}·T²·KL + {1 - alpha:g}·CE at T {temperature:g}: "
                             "not comparable with the validation cross-entropy"}


class _TeacherTerm(Callback):
    """Mixes the teacher's soft term into the run's loss for a batch's targets (`targets`)."""
    key = "teacher"

    def __init__(self, teacher: Teacher, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def targets(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    def after_loss(self, state: State, loss: torch.Tensor) -> torch.Tensor:
        logits = state.batch[2]
        target = self.targets(state).float().to(logits.device)
        return mix(loss, logits.float(), target, self.temperature, self.alpha)


class TeacherInLoop(_TeacherTerm):
    """The teacher scores every training batch: the student's own (augmented) pixels."""

    def __init__(self, teacher: Teacher, student_mean, student_std, temperature: float, alpha: float):
        super().__init__(teacher, temperature, alpha)
        self.mean = torch.tensor(student_mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(student_std).view(1, 3, 1, 1) * 255

    def targets(self, state: State) -> torch.Tensor:
        x = state.batch[0]
        if x.dim() != 4:
            raise GraftError("distillation with the teacher in the loop needs image batches, but this "
                             "stage trains on cached features (train.cache_features must be false)")
        pixels = x.float() * self.std.to(x.device) + self.mean.to(x.device)  # back to 0..255
        return self.teacher.pixel_logits(pixels)


class RowTargets(_TeacherTerm):
    """The teacher's logits ride with their rows through the loop as per-row targets (batches of
    (x, y, teacher logits)): a frozen student on cached features, pruning's recovery."""

    def targets(self, state: State) -> torch.Tensor:
        return state.batch[3]


class CachedTeacher(RowTargets):
    """The teacher's logits of each training image, computed once (and cached), as per-row targets
    of the frozen stage; a transfer set (`transfer`: a path, at most `transfer_max` of its images)
    adds rows the teacher labels. `sets`: the run's splits at the teacher's input size, decoded once
    (the report's teacher accuracy reads them too)."""

    def __init__(self, teacher: Teacher, temperature: float, alpha: float, transfer: str | None = None,
                 transfer_max: int | None = None):
        super().__init__(teacher, temperature, alpha)
        self.transfer, self.transfer_max, self.n_transfer, self.sets = transfer, transfer_max, 0, None

    def feature_rows(self, job, x, y, targets):
        cfg, source = job.cfg, job.source
        cache = cache_root(cfg.cache_dir) if cfg.train.cache_features else None
        self.sets = _sets_at(cfg, self.teacher.image_size, job.sets)
        images = self.sets["train"]
        teach, hit = teacher_logits(self.teacher, images, source.fingerprint, cache)
        log(f"teacher logits train: {tuple(teach.shape)} {'from cache' if hit else 'computed'}")
        if self.transfer:  # unlabeled images: the teacher's logits are their only targets
            t_source, t_images = transfer_images(cfg, self.transfer, self.transfer_max, source, job.sets,
                                                 max(self.teacher.image_size, job.spec.image_size))
            self.n_transfer = len(t_images)
            t_logits, _ = teacher_logits(self.teacher, t_images, t_source.fingerprint, cache)
            t_x = split_features(job.model, job.spec, cfg, t_source, t_images, "transfer")
            x, y, teach = torch.cat([x, t_x]), torch.cat([y, t_images.labels]), torch.cat([teach, t_logits])
        return x, y, teach


def _sets_at(cfg: RunConfig, size: int, sets: dict[str, ImageSet]) -> dict[str, ImageSet]:
    """The same splits decoded at another input size (a teacher that sees larger images)."""
    from ..backbones import get_spec
    if size <= (cfg.backbone.image_size or get_spec(cfg.backbone.name).input_size):
        return sets  # images are kept at most at the student's size: the teacher resizes them itself
    other = load_data(replace(cfg, backbone=replace(cfg.backbone, image_size=size)))[1]
    if any(other[k].keys != sets[k].keys for k in sets):
        raise DataError("teacher and student decoded different images (unreadable files?): use --skip-bad consistently")
    return other


def transfer_images(cfg: RunConfig, transfer: str, transfer_max: int | None, source, sets: dict[str, ImageSet],
                    size: int):
    """(source, ImageSet) of a transfer set, labels -1, decoded at `size`. A data set graftnet can
    read contributes its training images (never its test split); any other folder, every image
    under it. When it is the run's own data set, the run's train, val and test images are left out:
    the labeled ones are used already and the others must stay unseen."""
    from ..data.decoded import decode_split
    from ..data.sources import open_source, open_unlabeled
    try:
        other = open_source(transfer, cfg.cache_dir, min_classes=1)  # unlabeled use: any number
    except DataError:
        if not Path(transfer).is_dir():
            raise
        other = open_unlabeled(Path(transfer), source.classes)  # any layout: the teacher labels them
    keys = [k for split in ("train", "all") for k, _ in other.splits.get(split, [])]
    excluded = 0
    if other.fingerprint == source.fingerprint:
        used = {k for split in sets.values() for k in split.keys}
        excluded = sum(k in used for k in keys)
        keys = [k for k in keys if k not in used]
    if transfer_max is not None and len(keys) > transfer_max:
        pick = torch.randperm(len(keys), generator=torch.Generator().manual_seed(cfg.train.seed))
        keys = [keys[i] for i in sorted(pick[:transfer_max].tolist())]
    if not keys:
        raise DataError(f"{transfer}: no transfer images left"
                        + (f" ({excluded} are this run's own train/val/test images)" if excluded else ""))
    images = decode_split(other, [(k, -1) for k in keys], size, cfg.data, cfg.cache_dir)
    log(f"transfer set: {len(images)} unlabeled images from {other.location}"
        + (f" ({excluded} of the run's own images left out)" if excluded else ""))
    return other, images
