"""Knowledge distillation (Hinton et al. 2015): a student run trained on a teacher's soft predictions.

    loss = alpha * T² * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)

T² keeps the soft term's gradients on the scale of the hard term's as T grows. With the student's
backbone frozen and no augmentation, both sides are fixed per image: the student's pooled features
come from the usual feature cache and the teacher's logits are computed once and cached too, so the
student's head trains in seconds. Any other student (augmented, fine-tuned) learns with the teacher
scoring each of its batches instead (teach.py). alpha = 0 (`--no-teacher`) is plain cross-entropy
with the same budget: the baseline a distilled student has to beat. A transfer set (`--transfer`: unlabeled
images, or the rest of a data set the run only sliced) adds images the teacher labels: they count
in the soft term only, and are where a teacher helps most (Hinton et al. distilled on such sets).

A teacher is anything with `identity`, `image_size`, `classes`, `__call__(ImageSet) -> logits` and
`pixel_logits(batch) -> logits` (RunTeacher: a finished run folder or a `graft ensemble` folder).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
import yaml

from .. import config as config_mod
from ..config import RunConfig
from ..data.images import ImageSet
from ..errors import ConfigError, DataError, GraftError
from ..evaluation import finish_evaluation
from ..predictor import load_predictor
from ..heads import make_mlp
from ..io import atomic_write_json, atomic_write_text, cache_root, save_tensors
from ..model import build_model, save_model
from ..progress import log
from ..run import new_run_dir, run_scope, write_environment, write_history
from ..train.callbacks import EarlyStopping
from ..train.features import cache_key
from ..train.loop import State, feature_batches, fit, make_optimizer, predict_logits
from .teach import SETTINGS_FILE, distill_in_loop, loss_card, needs_teacher_in_loop, soft_term


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


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, temperature: float,
            alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Rows labeled -1 (unlabeled transfer images) count in the soft term only."""
    known = labels >= 0
    if known.all():
        hard = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    else:
        hard = (F.cross_entropy(student[known], labels[known], label_smoothing=label_smoothing)
                if known.any() else student.sum() * 0)
    if alpha == 0 or teacher is None:
        return hard
    return alpha * temperature ** 2 * soft_term(student, teacher, temperature) + (1 - alpha) * hard


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
        self.spec, self.cfg = self.predictor.spec, self.predictor.cfg
        self.image_size, self.classes = self.predictor.image_size, self.predictor.classes
        self.identity = _identity(self.predictor)

    def __call__(self, images: ImageSet) -> torch.Tensor:
        return self.predictor.logits(images, self.cfg.train.eval_batch_size, "teacher")

    def pixel_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """One training batch's logits (teacher in the loop: teach.py)."""
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


def _sets_at(cfg: RunConfig, size: int, sets: dict[str, ImageSet]) -> dict[str, ImageSet]:
    """The same splits decoded at another input size (a teacher that sees larger images)."""
    from ..backbones import get_spec
    from ..train.pipeline import load_data
    if size <= (cfg.backbone.image_size or get_spec(cfg.backbone.name).input_size):
        return sets  # images are kept at most at the student's size: the teacher resizes them itself
    other = load_data(replace(cfg, backbone=replace(cfg.backbone, image_size=size)))[1]
    if any(other[k].keys != sets[k].keys for k in sets):
        raise DataError("teacher and student decoded different images (unreadable files?): use --skip-bad consistently")
    return other


def transfer_images(cfg: RunConfig, s: DistillSettings, source, sets: dict[str, ImageSet], size: int):
    """(source, ImageSet) of the transfer set, labels -1, decoded at `size`. A data set graftnet can
    read contributes its training images (never its test split); any other folder, every image
    under it. When it is the run's own data set, the run's train, val and test images are left out:
    the labeled ones are used already and the others must stay unseen."""
    from ..data.images import load_images
    from ..data.sources import open_source, open_unlabeled
    try:
        other = open_source(s.transfer, cfg.cache_dir)
    except DataError:
        if not Path(s.transfer).is_dir():
            raise
        other = open_unlabeled(Path(s.transfer), source.classes)  # any layout: the teacher labels them
    keys = [k for split in ("train", "all") for k, _ in other.splits.get(split, [])]
    excluded = 0
    if other.fingerprint == source.fingerprint:
        used = {k for split in sets.values() for k in split.keys}
        excluded = sum(k in used for k in keys)
        keys = [k for k in keys if k not in used]
    if s.transfer_max is not None and len(keys) > s.transfer_max:
        pick = torch.randperm(len(keys), generator=torch.Generator().manual_seed(cfg.train.seed))
        keys = [keys[i] for i in sorted(pick[:s.transfer_max].tolist())]
    if not keys:
        raise DataError(f"{s.transfer}: no transfer images left"
                        + (f" ({excluded} are this run's own train/val/test images)" if excluded else ""))
    images = load_images(other, [(k, -1) for k in keys], size, cfg.data.skip_bad, cfg.data.workers,
                         gray=cfg.data.grayscale)
    log(f"transfer set: {len(images)} unlabeled images from {other.location}"
        + (f" ({excluded} of the run's own images left out)" if excluded else ""))
    return other, images


def distill(cfg: RunConfig | None, settings: DistillSettings | None, teacher: Teacher | None = None,
            resume: str | Path | None = None) -> Path:
    """Train a student run from `cfg`, taught by `teacher` (or settings.teacher); returns its folder.
    A student that sees each image one way (frozen, cached features, no augmentation) trains on
    cached teacher logits; any other with the teacher in the loop (teach.py), which can `resume`."""
    if resume:
        cfg, settings = _resume_point(Path(resume))
    settings.check()
    if teacher is None and settings.alpha > 0:
        teacher = RunTeacher(settings.teacher)
    if needs_teacher_in_loop(cfg):
        return distill_in_loop(cfg, settings, teacher, Path(resume) if resume else None)
    run_dir = new_run_dir(cfg.out, cfg.name, cfg.backbone.name)
    config_mod.save_yaml(cfg, run_dir / "config.yaml")
    atomic_write_text(run_dir / SETTINGS_FILE, yaml.safe_dump({"distill": asdict(settings)}, sort_keys=False))
    with run_scope(run_dir):
        return _distill(cfg, settings, teacher, run_dir)


def _resume_point(run_dir: Path) -> tuple[RunConfig, DistillSettings]:
    try:
        settings = DistillSettings(**yaml.safe_load((run_dir / SETTINGS_FILE).read_text())["distill"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise GraftError(f"{run_dir}: not a distillation run folder ({SETTINGS_FILE}: {e})") from None
    cfg = config_mod.resolve(run_dir / "config.yaml")
    if not needs_teacher_in_loop(cfg):
        raise GraftError(f"{run_dir}: a distillation on cached features and logits keeps no checkpoint "
                         "(it trains in seconds once the caches exist): start it again")
    if (run_dir / "distill.json").is_file():
        raise GraftError(f"{run_dir}: this distillation finished already (distill.json exists)")
    return cfg, settings


def _distill(cfg: RunConfig, s: DistillSettings, teacher: Teacher | None, run_dir: Path) -> Path:
    from ..train.pipeline import load_data, schedule_callbacks, seed_everything, split_features
    log(f"run folder: {run_dir} (distillation: teacher {s.teacher or 'none'}, T {s.temperature}, alpha {s.alpha})")
    write_environment(run_dir, cfg.train.seed)
    generator = seed_everything(cfg.train.seed)
    source, sets = load_data(cfg)
    t = cfg.train
    teach, teacher_acc = None, None
    if teacher is not None:
        if list(teacher.classes) != list(source.classes):
            raise DataError(f"the teacher's classes {teacher.classes} differ from the data's {source.classes}")
        cache = cache_root(cfg.cache_dir) if t.cache_features else None
        t_sets = _sets_at(cfg, teacher.image_size, sets)
        teach, hit = teacher_logits(teacher, t_sets["train"], source.fingerprint, cache)
        log(f"teacher logits train: {tuple(teach.shape)} {'from cache' if hit else 'computed'}")
        test_t, _ = teacher_logits(teacher, t_sets["test"], source.fingerprint, cache)
        teacher_acc = (test_t.argmax(1) == sets["test"].labels).float().mean().item() if len(sets["test"]) else None
    model, spec = build_model(cfg, source.classes)
    torch.manual_seed(t.seed)  # as in train(): the head's init does not depend on the backbone's build
    model.mlp = make_mlp(spec.feature_dim, spec.num_classes, cfg.head)
    train_x = split_features(model, spec, cfg, source, sets["train"], "train")
    labels = sets["train"].labels
    n_transfer = 0
    if s.transfer:  # unlabeled images: the teacher's logits are their only targets
        t_source, t_images = transfer_images(cfg, s, source, sets, max(teacher.image_size, spec.image_size))
        t_logits, _ = teacher_logits(teacher, t_images, t_source.fingerprint, cache)
        t_x = split_features(model, spec, cfg, t_source, t_images, "transfer")
        n_transfer = len(t_images)
        train_x, labels = torch.cat([train_x, t_x]), torch.cat([labels, t_images.labels])
        teach = torch.cat([teach, t_logits])
    optimizer = make_optimizer(list(model.mlp.parameters()), t.optimizer, t.lr, t.weight_decay)
    n_batches = -(-len(labels) // t.batch_size)
    state = State()
    callbacks = schedule_callbacks(optimizer, t.schedule, t.warmup_epochs, t.epochs, 0, len(labels),
                                   t.batch_size, state)
    stopper = EarlyStopping(model.mlp, run_dir, t.early_stopping, t.monitor) if t.early_stopping else None
    callbacks += [stopper] if stopper else []

    current: dict[str, torch.Tensor | None] = {"teacher": None}  # the batch's teacher logits, for the loss

    def train_batches():
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(order), t.batch_size):
            idx = order[i:i + t.batch_size]
            current["teacher"] = teach[idx] if teach is not None else None
            yield train_x[idx].float(), labels[idx]

    def loss_fn(logits, y):
        return kd_loss(logits, current["teacher"], y, s.temperature, s.alpha, t.label_smoothing)

    val_x = split_features(model, spec, cfg, source, sets["val"], "val") if len(sets["val"]) else None
    fit(model.mlp, train_batches, n_batches,
        (lambda: feature_batches(val_x, sets["val"].labels, t.eval_batch_size, None)) if val_x is not None else None,
        optimizer, t.epochs, state, callbacks, loss_fn=loss_fn)
    if stopper:
        stopper.restore(state)
    test_x = split_features(model, spec, cfg, source, sets["test"], "test")
    logits, test_labels = predict_logits(model.mlp, feature_batches(test_x, sets["test"].labels, t.eval_batch_size, None))
    save_model(model, spec, run_dir)
    write_history(run_dir, state.history)
    cards = {"teacher": s.teacher or "none (hard labels only)", **loss_card(s.alpha, s.temperature)}
    if teacher_acc is not None:
        cards["teacher test accuracy"] = f"{teacher_acc:.4f}"
    if n_transfer:
        cards["transfer images"] = f"{n_transfer:,} unlabeled"
    m = finish_evaluation(run_dir, cfg, spec, state.history, logits, test_labels, sets["test"], sets["train"],
                          cards=cards)
    atomic_write_json(run_dir / "distill.json", {**asdict(s), "teacher_test_acc": teacher_acc,
                                                 "student_test_acc": m["accuracy"],
                                                 "labeled_images": len(sets["train"]),
                                                 "transfer_images": n_transfer})
    return run_dir
