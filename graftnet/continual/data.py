"""The rows every task trains and is scored on: the frozen backbone's cached features of each data
source, labelled with the head's global output index and the task that brings the class.

Features are computed once per source (the usual feature cache, train/inputs.py), so every method,
seed and task order of a continual run reads the same rows: a prototype method over Split CIFAR-10
costs seconds once the cache is filled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import RunConfig
from ..data.sources import Source
from ..heads import GraftedModel
from ..model import ModelSpec, build_model
from ..progress import log
from ..train.inputs import load_data, split_features
from .tasks import TaskSequence, check_tasks

SPLITS = ("train", "val", "test")


@dataclass
class SourceFeatures:
    source: Source
    x: dict[str, torch.Tensor]        # split -> N x D features
    labels: dict[str, torch.Tensor]   # split -> the source's own class index per row
    keys: dict[str, list[str]]


@dataclass
class TaskTable:
    """All rows of a task sequence, per split: features, global class id (the head's output), task."""
    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    task: dict[str, torch.Tensor]
    classes: list[str]                # the head's outputs, in task order
    task_names: list[str]
    task_cols: list[torch.Tensor]     # each task's output columns (a contiguous range)

    def rows(self, split: str, tasks) -> torch.Tensor:
        """Indices of the split's rows that belong to any of `tasks`."""
        return torch.nonzero(torch.isin(self.task[split], torch.as_tensor(list(tasks)))).flatten()

    @property
    def dim(self) -> int:
        return self.x["train"].shape[1]


def load_features(cfg: RunConfig, seq: TaskSequence, scenario: str, built: tuple | None = None,
                  top_groups: int = 0) -> tuple[dict[str, SourceFeatures], GraftedModel, ModelSpec]:
    """Decode each source the tasks read and cache its features on the config's backbone; check the
    tasks against the sources' classes first (one line for a class a source lacks). Returns the
    model too: a run saves this very backbone (a random-weight one is not built the same twice)."""
    from ..data.sources import open_source
    opened = {loc: open_source(loc, cfg.cache_dir) for loc in seq.sources()}
    check_tasks(seq, scenario, {loc: s.classes for loc, s in opened.items()})
    out, (model, spec) = {}, built or (None, None)   # built: a finished run's (model, spec) (extend)
    for loc in opened:
        src_cfg = replace(cfg, data=replace(cfg.data, path=loc))
        source, sets = load_data(src_cfg)
        if model is None:
            model, spec = build_model(cfg, source.classes)
            model.eval()
        if top_groups:   # the maps entering the trained top, not pooled features
            feats = {s: split_maps(model, spec, src_cfg, source, sets[s], s, top_groups) for s in SPLITS}
        else:
            feats = {s: split_features(model, spec, src_cfg, source, sets[s], s).float() if len(sets[s])
                     else torch.empty(0, spec.feature_dim) for s in SPLITS}
        out[loc] = SourceFeatures(source, feats, {s: sets[s].labels for s in SPLITS},
                                  {s: sets[s].keys for s in SPLITS})
        log(f"continual: {loc}: " + ", ".join(f"{s} {len(sets[s])}" for s in SPLITS))
    return out, model, spec


def split_maps(model, spec: ModelSpec, cfg: RunConfig, source: Source, images, split: str, groups: int) -> torch.Tensor:
    """The maps below the top `groups` groups of one split, through the feature cache (continual/top.py)."""
    from ..features import cached_features
    from ..io import cache_root
    from ..train.inputs import feature_parts
    from .top import MapsBelow
    parts = {**feature_parts(spec, cfg), "maps_below_top_groups": groups}
    maps, hit = cached_features(
        MapsBelow(model, groups), images, parts, source.fingerprint,
        cache_root(cfg.cache_dir) if cfg.train.cache_features else None, size=spec.image_size, mean=spec.mean,
        std=spec.std, batch_size=cfg.train.eval_batch_size, micro_batch=cfg.train.micro_batch,
        precision=cfg.backbone.precision, channels_last=cfg.backbone.channels_last,
        description=f"backbone below its top {groups} groups: {split}")
    log(f"maps {split}: {tuple(maps.shape)} {'from cache' if hit else 'computed'}")
    return maps


def task_table(seq: TaskSequence, features: dict[str, SourceFeatures], scenario: str) -> TaskTable:
    """The rows of every task, with global class ids in task order. Task-incremental outputs are named
    task/class: two tasks may share a class name and still have heads of their own."""
    classes, cols = [], []
    lookup: dict[tuple[str, int], tuple[int, int]] = {}   # (source, source class) -> (task, global id)
    for i, t in enumerate(seq.tasks):
        loc = t.data or seq.data
        src = features[loc].source
        start = len(classes)
        for c in t.classes:
            lookup[(loc, src.classes.index(c))] = (i, len(classes))
            classes.append(f"{t.name}/{c}" if scenario == "task" else c)
        cols.append(torch.arange(start, len(classes)))
    x, y, task = {}, {}, {}
    for s in SPLITS:
        xs, ys, ts = [], [], []
        for loc, f in features.items():
            pairs = [lookup.get((loc, int(label)), (-1, -1)) for label in f.labels[s]]
            keep = torch.tensor([p[0] >= 0 for p in pairs], dtype=torch.bool)
            xs.append(f.x[s][keep])
            ys.append(torch.tensor([p[1] for p in pairs], dtype=torch.long)[keep])
            ts.append(torch.tensor([p[0] for p in pairs], dtype=torch.long)[keep])
        x[s], y[s], task[s] = torch.cat(xs), torch.cat(ys), torch.cat(ts)
    return TaskTable(x, y, task, classes, [t.name for t in seq.tasks], cols)
