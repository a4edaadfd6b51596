"""Search of a grafted network's head, features, input size and int8 export (Optuna): `graft search`.

    graft search --data DIR --trials 30 --timeout 1h [--space space.yaml] [--workers 2]
    graft search --data DIR --space nas.yaml --objectives val_acc,latency_ms [--max-latency-ms 5]

Each trial is an ordinary run (`train(cfg, test=False)`) under SEARCH/trials/trial-NNN. Trials with
the same backbone, image size and data share one feature cache (every feature mode is read from one
"blocks" pass), so after the first one a trial costs seconds. The base config is trial 0 when the
space holds its values. Trials are chosen on validation accuracy alone; only the chosen trials'
runs (the best one, and with several objectives the Pareto front) are scored on the test split,
once. The study lives in SEARCH/study.journal (Optuna's journal file: append-only, survives a
kill), so `graft search --resume SEARCH --trials N` goes on until N trials are done.

Objectives: validation accuracy alone (default, with the median pruner on each epoch's accuracy),
or with latency_ms (each trial's ONNX model timed with ONNX Runtime on this CPU, --latency-batch
images) and size_mb: the result is the Pareto front, and --max-latency-ms keeps only the trials
within it. The space may hold export.int8 ({type: bool}): such a trial ships its int8 model, so
its accuracy is the int8 model's on the validation split and its latency the int8 model's; and
prune.amount (with prune.finetune_epochs): the trained run is channel-pruned (`graft prune`,
scored on validation only) and the pruned run is the trial's.

Workers: `--workers N` runs N trials at a time in local processes sharing the study; --trials and
--timeout count for all of them, Ctrl-C lets the running trials end and stops them all. A worker
that dies (killed, out of memory) leaves its trial running: the others mark it failed and run its
parameters again, as does a later --resume.

Several machines share one study through a database, one search per database:
    graft search --data DIR --storage postgresql://USER@HOST:5432/DB --name s1   # the first machine
    graft search --join postgresql://USER@HOST:5432/DB [--data DIR] [--workers 2]  # any other one
A joining machine takes the base config, space and settings from the study and keeps its own
folder OUT/NAME (the search's name unless --name) with its trials' runs; --data says where it keeps
the same data if not at the base config's path. Keep the password out of the URL (~/.pgpass or
PGPASSWORD): search.yaml records the URL. `--resume SEARCH` rejoins from that folder.

A space is YAML, dotted config key -> one entry:
    train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}
    train.weight_decay: {type: float, low: 1e-6, high: 1e-2, log: true, zero: true}   # or exactly 0
    head.hidden: {type: layers, low: 0, high: 2, choices: [128, 256, 512]}   # layer count, width each
    train.optimizer: {type: categorical, choices: [adam, adamw]}
    train.flip_views: {type: bool, when: {backbone.features: multi}}   # sampled only when ... equals
`when` compares with the value sampled earlier in the space, else with the base config's.

Results: trials.csv/json, best.yaml (`graft train --config best.yaml` reproduces the best trial),
search.json, history/importance/Pareto plots and report.html. backbone.name, backbone.image_size,
backbone.cut (stages dropped from the end) and finetune.* are config keys like the head's: each new
backbone, size or cut costs a backbone pass, a fine-tuning trial what fine-tuning costs. Not
searched yet: channel pruning.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..config import check_folder_name, load_yaml, resolve
from ..errors import ConfigError
from ..fields import parse_duration
from .runner import run_search
from .settings import OBJECTIVES, PRUNERS, SAMPLERS, SearchSettings
from .space import DEFAULT_SPACE, check_space
from .storage import join_folder

# flags named as SearchSettings fields; a resumed or joined search keeps the study's, so these start one
SETTING_FLAGS = ("sampler", "pruner", "objectives", "max_latency_ms", "latency_batch")


def parse_timeout(text: str | None) -> float | None:
    """30m, 2h, 1h30m, 90s or plain seconds; None: no time budget."""
    return None if text is None else parse_duration(text, "--timeout")


def add_commands(sub) -> dict:
    from ..options import add_train_flags, number, train_overrides
    p = sub.add_parser("search", help="hyperparameter search of the head on the frozen backbone (Optuna)",
                       description=__doc__.split("\n\n")[0])
    add_train_flags(p, exclude=("out", "name"), resume=False)
    p.add_argument("--space", metavar="YAML", help="search space (default: head widths, dropout, "
                   "optimizer, lr, weight decay, smoothing, batch size, epochs, flip views, features)")
    p.add_argument("--trials", type=number(int, 0), help="trials in all, across workers and resumes (default: 20; "
                   "with --resume or --join the study's total, which a given --trials changes for every worker)")
    p.add_argument("--timeout", help="time budget: 90s, 30m, 2h or seconds (no new trial starts after it)")
    p.add_argument("--resume", metavar="DIR", help="continue a search folder with its saved config and space")
    p.add_argument("--out", default="runs", help="the search folder is OUT/NAME (default: runs)")
    p.add_argument("--name", help="default: search-<timestamp> (with --join: the search's name)")
    p.add_argument("--workers", type=number(int, 1), metavar="N", help="local worker processes running trials at once (default: 1)")
    p.add_argument("--storage", metavar="URL", help="the study in a database, for workers on several machines: "
                   "postgresql://USER@HOST:PORT/DB or sqlite:///FILE (default: SEARCH/study.journal)")
    p.add_argument("--join", metavar="URL", help="work on the search whose study is in this database")
    p.add_argument("--sampler", choices=SAMPLERS, help="tpe (default), random, or grid (every combination "
                   "of a space of categorical and bool entries, each once)")
    p.add_argument("--pruner", choices=PRUNERS, help="stops poor trials early on validation accuracy: median "
                   "(default), hyperband or none; single-objective searches only (Optuna prunes no other)")
    p.add_argument("--objectives", type=lambda t: [o.strip() for o in t.split(",") if o.strip()],
                   metavar="LIST", help=f"val_acc first, then any of {', '.join(o for o in OBJECTIVES if o != 'val_acc')}, "
                   "comma-separated (default: val_acc)")
    p.add_argument("--max-latency-ms", type=number(float, 0, low_open=True), metavar="MS", help="trials slower than this are infeasible")
    p.add_argument("--latency-batch", type=number(int, 1), metavar="N", help="batch size latency is measured at (default: 1)")

    def cmd_search(args) -> None:
        import shlex
        import sys
        timeout_s = parse_timeout(args.timeout)
        command = "graft " + shlex.join(sys.argv[1:])
        settings = {f: getattr(args, f) for f in SETTING_FLAGS if getattr(args, f) is not None}
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: at least 1")
        if args.trials is not None and args.trials < 0:
            raise ConfigError(f"--trials {args.trials}: a count, 0 or more")
        if args.resume or args.join:
            if args.resume and args.join:
                raise ConfigError("--resume DIR and --join URL: give one (--resume rejoins from its folder)")
            keep = ("out", "name", "data.path") if args.join else ("out", "name")
            given = [k for k, v in train_overrides(args).items() if v is not None and k not in keep]
            given += [f"--{f.replace('_', '-')}" for f in settings] + (["--storage"] if args.storage else [])
            given += ["--config"] * bool(args.config) + ["--space"] * bool(args.space)
            if given:  # silently ignoring them would mislead
                raise ConfigError(f"{'--resume' if args.resume else '--join'} continues with the search's saved "
                                  f"base.yaml, space.yaml and search.yaml; drop {', '.join(given)} (or start a new search)")
            folder = (join_folder(args.join, args.out, args.name, args.data, args.workers or 1)
                      if args.join else args.resume)
            run_search(None, None, folder, args.trials, timeout_s, resume=True, command=command,
                       workers=args.workers)
            print(folder)
            return
        space = check_space(load_yaml(args.space)) if args.space else DEFAULT_SPACE
        # --out/--name place the search folder; the base config keeps --out (where best.yaml's rerun goes)
        cfg = resolve(args.config, {**train_overrides(args), "name": None})
        if cfg.data.labels:
            from ..data.labels import open_data
            if open_data(cfg.data, cfg.cache_dir).multilabel:
                raise ConfigError(f"{cfg.data.labels}: multi-label data; the search ranks trials by validation "
                                  "accuracy and int8 by top-1 agreement, both one class per image")
        search = SearchSettings(**settings, seed=cfg.train.seed, workers=args.workers or 1, storage=args.storage)
        check_folder_name(args.name, "--name")
        folder = Path(args.out) / (args.name or f"search-{time.strftime('%Y%m%d-%H%M%S')}")
        run_search(cfg, space, folder, args.trials, timeout_s, command=command, settings=search)
        print(folder)
    return {"search": cmd_search}
