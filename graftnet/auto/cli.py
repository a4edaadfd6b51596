"""`graft auto`: from a folder of images to a deployment folder within a wall-clock budget.

    graft auto --data DIR --budget 30m [--max-latency-ms X] [--target cpu|gpu] [--name N] [--dry-run]
    graft auto --resume OUT/NAME
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

from ..config import check_folder_name, resolve
from ..errors import ConfigError


def add_commands(sub) -> dict:
    from ..options import number
    p = sub.add_parser("auto", help="from a folder of images to a deployable model within a time budget: "
                       "probe backbones, search the head, fine-tune, int8, export", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="class folder, ZIP, CIFAR archive or 'cifar10' (as graft train's --data)")
    p.add_argument("--budget", help="wall-clock budget: 90s, 30m, 1h30m or seconds (the command ends "
                   "within it plus 10%%)")
    p.add_argument("--max-latency-ms", type=number(float, 0, low_open=True), metavar="MS",
                   help="ship only a model this fast (ONNX Runtime, batch 1, measured on this machine)")
    p.add_argument("--target", choices=("cpu", "gpu"), default="cpu", help="where the model will run (default: cpu)")
    p.add_argument("--backbones", metavar="LIST", help="candidates NAME[:PX], comma-separated (default: "
                   "efficientnet_lite0:224,efficientnet_lite0:160,mobilenetv2:224)")
    p.add_argument("--out", default="runs", help="the auto folder is OUT/NAME (default: runs)")
    p.add_argument("--name", help="default: auto-<timestamp>")
    p.add_argument("--config", metavar="YAML", help="base config (seeds, cache, data options); auto sets "
                   "backbone, head, training and fine-tuning")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key of the base config")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its time estimates; train nothing")
    p.add_argument("--resume", metavar="DIR", help="continue an auto folder after a kill or Ctrl-C")
    return {"auto": cmd_auto}


def command_line(args) -> str:
    """The command that remakes this auto folder (for the model card): the flags as given."""
    parts = ["graft", "auto"]
    for flag in ("data", "budget", "max_latency_ms", "target", "backbones", "out", "name", "config"):
        value = getattr(args, flag)
        if value is not None and not (flag == "target" and value == "cpu"):
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    for item in args.set:
        parts += ["--set", item]
    return shlex.join(parts)


def cmd_auto(args) -> None:
    from ..options import train_overrides
    from .budget import parse_budget
    from .probe import parse_candidates
    from .runner import Request, run_auto
    if args.resume:
        given = [f"--{f.replace('_', '-')}" for f in ("data", "budget", "max_latency_ms", "backbones", "name", "config")
                 if getattr(args, f) is not None] + (["--set"] if args.set else []) + (["--dry-run"] if args.dry_run else [])
        if given:  # silently ignoring them would mislead
            raise ConfigError(f"--resume goes on with the folder's own settings; drop {', '.join(given)}")
        run_auto(Request(cfg=None, budget_s=0.0, candidates=[]), Path(args.resume), resume=True)
        print(args.resume)
        return
    if not args.data:
        raise ConfigError("--data DIR: the images to learn from (or --resume DIR)")
    if not args.budget:
        raise ConfigError("--budget: how long it may take, e.g. 30m, 1h30m or 600 (seconds)")
    budget_s = parse_budget(args.budget)
    candidates = parse_candidates(args.backbones)
    check_folder_name(args.name, "--name")
    overrides = {**train_overrides(args), "data.path": args.data}
    cfg = resolve(args.config, overrides)
    name = args.name or f"auto-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(args.out) / name
    req = Request(cfg=cfg, budget_s=budget_s, candidates=candidates, max_latency_ms=args.max_latency_ms,
                  target=args.target, command=command_line(args))
    run_auto(req, folder, dry_run=args.dry_run)
    if not args.dry_run:
        print(folder)
