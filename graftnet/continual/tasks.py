"""A sequence of tasks: which classes (of which data) each one brings, and how a continual run is set.

    # tasks.yaml
    data: cifar10              # default data of every task (a folder, ZIP, CIFAR archive or 'cifar10')
    tasks:
      - {name: vehicles, classes: [airplane, automobile, ship, truck]}
      - {name: animals, classes: [bird, cat, deer, dog, frog, horse]}
      - {name: scans, data: /data/xray, classes: [NORMAL, PNEUMONIA]}   # a task from other data

Or, built in, Split CIFAR-10 (or any class-folder data): `split_tasks(classes, 5, seed)` cuts the
data's classes into 5 tasks of 2 in an order drawn from the seed (seed None: the data's order).

Classes get global output indices in the order the tasks bring them, so a task's classes are one
contiguous range of the head's outputs and an old class keeps its index as new ones arrive.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..fields import option
from .prototype import PROJECTION

SCENARIOS = ("class", "task")


@dataclass
class ContinualSettings:
    """How tasks are learned; saved as continual.yaml beside the runs, so --resume runs the same."""
    scenario: str = option("class", choices=SCENARIOS, help="class: one growing head, the task unknown "
                           "at test time; task: a head per task, the task known at test time")
    methods: list[str] = field(default_factory=lambda: ["naive", "ewc", "lwf", "replay", "ncm", "ridge", "joint"])
    seeds: list[int] = field(default_factory=lambda: [0])
    order_seeds: list[int] = field(default_factory=list)  # split task orders: one run per order (and seed)
    ewc_lambda: float = option(100.0, help="EWC's penalty strength (on the sum over parameters of F (θ-θ*)²/2)")
    ewc_gamma: float = option(1.0, help="online EWC: the old Fisher's weight when a task's is added (1: a sum)")
    fisher_samples: int = option(2000, help="training rows of a task that its diagonal Fisher is estimated on")
    lwf_alpha: float = option(1.0, help="LwF: weight of the distillation term on old classes' outputs")
    lwf_temperature: float = option(2.0, help="LwF: softmax temperature of the distillation term")
    replay: int = option(500, help="replay: rows kept in the class-balanced buffer, over all classes")
    top_groups: int = option(0, help="also train the backbone's top N groups (as finetune.unfreeze top:N "
                             "counts them) on the cached maps below them: gradient methods on every task, "
                             "ncm and ridge on the first task only (first-task adaptation); 0: frozen")
    projection: int = option(PROJECTION, help="ridge: random features (RanPAC; 0: ridge on the features themselves)")

    def check(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ConfigError(f"continual scenario {self.scenario!r}: one of {', '.join(SCENARIOS)}")
        if not self.methods:
            raise ConfigError("continual: no method to run (--methods)")
        if not self.seeds:
            raise ConfigError("continual: no seed to run (--seeds)")
        for key in ("ewc_lambda", "lwf_alpha", "replay", "projection", "top_groups"):
            if getattr(self, key) < 0:
                raise ConfigError(f"continual {key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.ewc_gamma <= 1:
            raise ConfigError(f"continual ewc_gamma: must be in [0, 1], got {self.ewc_gamma}")
        if self.fisher_samples < 1:
            raise ConfigError(f"continual fisher_samples: at least 1, got {self.fisher_samples}")
        if self.lwf_temperature <= 0:
            raise ConfigError(f"continual lwf_temperature: must be positive, got {self.lwf_temperature}")


@dataclass
class Task:
    name: str
    classes: list[str]
    data: str | None = None     # None: the sequence's data


@dataclass
class TaskSequence:
    data: str
    tasks: list[Task]

    def sources(self) -> list[str]:
        """Every data location the tasks read, in order of first use."""
        return list(dict.fromkeys(t.data or self.data for t in self.tasks))


def split_tasks(classes: list[str], n_tasks: int, seed: int | None = None) -> list[Task]:
    """The data's classes cut into `n_tasks` tasks of equal size (Split CIFAR-10: 5 of 2), in an order
    drawn from `seed` (None: the data's own order)."""
    if n_tasks < 1 or len(classes) % n_tasks:
        raise ConfigError(f"--split {n_tasks}: the data's {len(classes)} classes do not divide into "
                          f"{n_tasks} tasks of equal size")
    order = list(classes)
    if seed is not None:
        random.Random(seed).shuffle(order)
    size = len(order) // n_tasks
    return [Task(f"task{i + 1}", order[i * size:(i + 1) * size]) for i in range(n_tasks)]


def load_tasks(path: str | Path, data: str | None = None) -> TaskSequence:
    """tasks.yaml as a TaskSequence; `data` (the --data flag) is the default data of its tasks."""
    from ..config import load_yaml
    raw = load_yaml(path)
    unknown = sorted(set(raw) - {"data", "tasks"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (expected data and tasks)")
    entries = raw.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty list of {{name, classes[, data]}}")
    tasks = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or set(entry) - {"name", "classes", "data"}:
            raise ConfigError(f"{path}: task {i} must be a mapping with name, classes and optionally data, "
                              f"got {entry!r}")
        classes = entry.get("classes")
        if not isinstance(classes, list) or not classes:
            raise ConfigError(f"{path}: task {i} ({entry.get('name', 'unnamed')}) lists no classes")
        tasks.append(Task(str(entry.get("name") or f"task{i}"), [str(c) for c in classes],
                          str(entry["data"]) if entry.get("data") else None))
    base = data or raw.get("data")
    if base is None and any(t.data is None for t in tasks):
        raise ConfigError(f"{path}: a task has no data: give 'data' at the top, per task, or --data")
    return TaskSequence(str(base) if base else tasks[0].data, tasks)


def check_tasks(seq: TaskSequence, scenario: str, available: dict[str, list[str]]) -> None:
    """One clear line for a sequence that cannot be learned: a class its data lacks, a class twice in
    a task, or (class-incremental: one head over all classes) a class an earlier task already
    brought. `available`: data location -> its classes."""
    names = [t.name for t in seq.tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"tasks: the name(s) {', '.join(twice)} are used by more than one task")
    seen: dict[str, str] = {}
    for t in seq.tasks:
        where = t.data or seq.data
        missing = [c for c in t.classes if c not in available[where]]
        if missing:
            raise ConfigError(f"task {t.name}: class(es) {', '.join(missing)} are not in {where} "
                              f"(its classes: {', '.join(available[where])})")
        dup = sorted({c for c in t.classes if t.classes.count(c) > 1})
        if dup:
            raise ConfigError(f"task {t.name}: class(es) {', '.join(dup)} listed twice")
        for c in t.classes:
            if scenario == "class" and c in seen:
                raise ConfigError(f"task {t.name} repeats class {c!r} of task {seen[c]}: in class-incremental "
                                  "learning each class belongs to one task (use --scenario task for tasks "
                                  "that share classes)")
            seen.setdefault(c, t.name)
