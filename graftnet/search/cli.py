"""Hyperparameter search of the head on the frozen backbone (Optuna): `graft search`.

    graft search --data DIR --trials 30 --timeout 1h [--space space.yaml]

Each trial is an ordinary run (`train(cfg, test=False)`) under SEARCH/trials/trial-NNN. Trials with
the same backbone, image size, features and data share the feature cache, so after the first one a
trial costs seconds. Trials are chosen on validation accuracy alone; only the best trial's run is
scored on the test split, once, so the test accuracy in search.json is not itself chosen by the search.
The study lives in SEARCH/study.journal (Optuna's journal file: append-only, survives a kill), so
`graft search --resume SEARCH --trials N` goes on until N trials are done.

A space is YAML, dotted config key -> one entry:
    train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}
    train.weight_decay: {type: float, low: 1e-6, high: 1e-2, log: true, zero: true}   # or exactly 0
    head.hidden: {type: layers, low: 0, high: 2, choices: [128, 256, 512]}   # layer count, width each
    train.optimizer: {type: categorical, choices: [adam, adamw]}
    train.flip_views: {type: bool, when: {backbone.features: multi}}   # sampled only when ... equals
`when` compares with the value sampled earlier in the space, else with the base config's.

Not in this slice (later): architecture search beyond the head's widths, multi-objective search
(accuracy against latency), distributed workers on PostgreSQL, plots and a report.html, the benchmark.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from ..config import load_yaml, resolve
from ..errors import ConfigError
from .runner import run_search
from .space import DEFAULT_SPACE, check_space


def parse_timeout(text: str | None) -> float | None:
    """30m, 2h, 90s or plain seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--timeout {text}: expected a positive duration like 90s, 30m, 2h or seconds")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def add_commands(sub) -> dict:
    from ..options import add_train_flags, train_overrides
    p = sub.add_parser("search", help="hyperparameter search of the head on the frozen backbone (Optuna)",
                       description=__doc__.split("\n\n")[0])
    add_train_flags(p, exclude=("out", "name"), resume=False)
    p.add_argument("--space", metavar="YAML", help="search space (default: head widths, dropout, "
                   "optimizer, lr, weight decay, smoothing, batch size, epochs, flip views, features)")
    p.add_argument("--trials", type=int, default=20, help="trials in all, counting a resumed folder's (default: 20)")
    p.add_argument("--timeout", help="time budget: 90s, 30m, 2h or seconds (no new trial starts after it)")
    p.add_argument("--resume", metavar="DIR", help="continue a search folder with its saved config and space")
    p.add_argument("--out", default="runs", help="the search folder is OUT/NAME (default: runs)")
    p.add_argument("--name", help="default: search-<timestamp>")

    def cmd_search(args) -> None:
        import shlex
        import sys
        timeout_s = parse_timeout(args.timeout)
        command = "graft " + shlex.join(sys.argv[1:])
        if args.resume:
            given = [k for k, v in train_overrides(args).items() if v is not None and k not in ("out", "name")]
            if given or args.config or args.space:  # silently ignoring them would mislead
                raise ConfigError("--resume continues with the folder's saved base.yaml and space.yaml; "
                                  f"drop {', '.join(given) or '--config/--space'} (or start a new search)")
            run_search(None, None, args.resume, args.trials, timeout_s, resume=True, command=command)
            print(args.resume)
            return
        space = check_space(load_yaml(args.space)) if args.space else DEFAULT_SPACE
        # --out/--name place the search folder; the base config keeps --out (where best.yaml's rerun goes)
        cfg = resolve(args.config, {**train_overrides(args), "name": None})
        folder = Path(args.out) / (args.name or f"search-{time.strftime('%Y%m%d-%H%M%S')}")
        run_search(cfg, space, folder, args.trials, timeout_s, command=command)
        print(folder)
    return {"search": cmd_search}
