"""`graft continual`: learn a sequence of tasks with several methods and see, in numbers, what each
forgets; `graft extend`: teach a finished run new classes.

    graft continual --data cifar10 --split 5 --methods naive,ewc,lwf,replay,ncm,ridge,joint --seeds 0,1,2
    graft continual --tasks tasks.yaml --scenario task --methods naive,ewc --ewc-lambda 1000
    graft continual --resume runs/continual-...            # goes on after the last finished task
    graft extend RUN --data NEW_CLASSES [--method ridge]

Every train flag sets the base config of each run (backbone, image size, features, head, epochs
per task, learning rate...): the backbone stays frozen and its features are cached once, so a
prototype method over Split CIFAR-10 costs seconds and a gradient method a head's training per task.
"""
from __future__ import annotations

import dataclasses
import time
import typing
from pathlib import Path

from ..config import check_folder_name, resolve
from ..errors import ConfigError
from .methods import METHODS
from .tasks import ContinualSettings, TaskSequence, load_tasks, split_tasks

# ContinualSettings' options (fields declared with option(): type, default, help, choices) are flags of
# their own, dashes for underscores; the list fields (methods, seeds) have flags of their own below
SETTINGS = {f.name: f for f in dataclasses.fields(ContinualSettings) if "help" in f.metadata}


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{text!r}: expected comma-separated integers such as 0,1,2") from None


def add_commands(sub) -> dict:
    from ..options import add_train_flags, number, train_overrides
    p = sub.add_parser("continual", help="learn a sequence of tasks (EWC, LwF, replay, prototypes...) and "
                       "measure forgetting", description=__doc__.split("\n\n")[0])
    add_train_flags(p, exclude=("out", "name"), resume=False)
    p.add_argument("--tasks", metavar="YAML", help="the task sequence (data and classes per task)")
    p.add_argument("--split", type=number(int, 1), metavar="N", help="cut the data's classes into N tasks of equal size "
                   "(Split CIFAR-10: --data cifar10 --split 5)")
    p.add_argument("--order-seeds", type=_ints, metavar="LIST", help="with --split: one task order per "
                   "seed, each run separately (default: the data's class order)")
    p.add_argument("--methods", metavar="LIST", help=f"comma-separated, from {', '.join(METHODS)}; combine "
                   "with + (ewc+replay) (default: all but online_ewc)")
    p.add_argument("--seeds", type=_ints, metavar="LIST", help="one run per seed (default: 0)")
    hints = typing.get_type_hints(ContinualSettings)
    for name, f in SETTINGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=hints[name], choices=f.metadata["choices"],
                       metavar=None if f.metadata["choices"] else "X", help=f"{f.metadata['help']} (default: {f.default})")
    p.add_argument("--resume", metavar="DIR", help="continue a continual folder with its saved settings")
    p.add_argument("--out", default="runs", help="the folder is OUT/NAME (default: runs)")
    p.add_argument("--name", help="default: continual-<timestamp>")

    def cmd_continual(args) -> None:
        import shlex
        import sys
        from .runner import run_continual
        command = "graft " + shlex.join(sys.argv[1:])
        if args.resume:
            given = [k for k, v in train_overrides(args).items() if v is not None and k not in ("out", "name")]
            given += [f for f in ("tasks", "split", "methods", "seeds", *SETTINGS) if getattr(args, f, None) is not None]
            if given:
                raise ConfigError(f"--resume continues with the folder's saved settings; drop {', '.join(given)}")
            run_continual(None, None, None, Path(args.resume), resume=True, command=command)
            print(args.resume)
            return
        cfg = resolve(args.config, {**train_overrides(args), "name": None})
        if cfg.data.labels:
            raise ConfigError("data.labels: continual tasks are sets of classes taken from class folders; "
                              "a label file is not supported by `graft continual`")
        sequences = build_sequences(args, cfg)
        settings = ContinualSettings(**{k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
        if args.methods:
            settings.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.seeds is not None:
            settings.seeds = args.seeds
        from .methods import method_parts
        for m in settings.methods:
            method_parts(m)  # an unknown name fails before any feature pass
        check_folder_name(args.name, "--name")
        folder = Path(args.out) / (args.name or f"continual-{time.strftime('%Y%m%d-%H%M%S')}")
        run_continual(cfg, sequences, settings, folder, command=command)
        print(folder)

    from .extend import add_extend
    return {"continual": cmd_continual, **add_extend(sub)}


def build_sequences(args, cfg) -> dict[str, TaskSequence]:
    """label -> sequence: one from --tasks, or one per --order-seeds of --split's cut of the data."""
    if bool(args.tasks) == bool(args.split):
        raise ConfigError("give the tasks: --tasks tasks.yaml or --split N (one of them)")
    if args.tasks:
        if args.order_seeds:
            raise ConfigError("--order-seeds orders --split's tasks; a tasks file gives its own order")
        return {"given": load_tasks(args.tasks, args.data)}
    from ..data.sources import open_source
    classes = open_source(cfg.data.path, cfg.cache_dir).classes
    seeds = args.order_seeds or [None]
    return {("given" if s is None else f"o{s}"): TaskSequence(cfg.data.path, split_tasks(classes, args.split, s))
            for s in seeds}
