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
                  top_groups: int = 0, opened: dict[str, Source] | None = None) -> tuple[dict[str, SourceFeatures], GraftedModel, ModelSpec]:
    """Decode each source the tasks read and cache its features on the config's backbone; check the
    tasks against the sources' classes first (one line for a class a source lacks). Returns the
    model too: a run saves this very backbone (a random-weight one is not built the same twice).
    `opened`: sources a caller opened already, by location."""
    from ..data.sources import open_source
    opened = {loc: (opened or {}).get(loc) or open_source(loc, cfg.cache_dir, min_classes=1)
              for loc in seq.sources()}  # a task's data may hold its one class; the sequence has more
    check_tasks(seq, scenario, {loc: s.classes for loc, s in opened.items()})
    out, (model, spec) = {}, built or (None, None)   # built: a finished run's (model, spec) (extend)
    for loc in opened:
        src_cfg = replace(cfg, data=replace(cfg.data, path=loc))
        source, sets = load_data(src_cfg, opened[loc])
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
    from .top import MapsBelow
    return split_features(MapsBelow(model, groups), spec, cfg, source, images, split,
                          extra_parts={"maps_below_top_groups": groups}, what="maps")


def task_table(seq: TaskSequence, features: dict[str, SourceFeatures], scenario: str) -> TaskTable:
    """The rows of every task, with global class ids in task order. Task-incremental outputs are named
    task/class: two tasks may share a class name and still have heads of their own."""
    classes, cols = [], []
    # per source: its class index -> (task, global id), -1 for a class no task brings
    task_of = {loc: torch.full((len(f.source.classes),), -1, dtype=torch.long) for loc, f in features.items()}
    global_of = {loc: torch.full((len(f.source.classes),), -1, dtype=torch.long) for loc, f in features.items()}
    for i, t in enumerate(seq.tasks):
        loc = t.data or seq.data
        src = features[loc].source
        start = len(classes)
        for c in t.classes:
            task_of[loc][src.classes.index(c)], global_of[loc][src.classes.index(c)] = i, len(classes)
            classes.append(f"{t.name}/{c}" if scenario == "task" else c)
        cols.append(torch.arange(start, len(classes)))
    x, y, task = {}, {}, {}
    for s in SPLITS:
        parts = []
        for loc, f in features.items():
            keep = task_of[loc][f.labels[s]] >= 0
            parts.append((f.x[s][keep], global_of[loc][f.labels[s]][keep], task_of[loc][f.labels[s]][keep]))
        x[s], y[s], task[s] = (torch.cat(p) for p in zip(*parts))
    return TaskTable(x, y, task, classes, [t.name for t in seq.tasks], cols)
