"""`graft prune` and `graft distill`: thin wrappers over prune_run and distill."""
from __future__ import annotations

from ..options import add_train_flags, number, train_overrides


def add_commands(sub) -> dict:
    p = sub.add_parser("prune", help="prune a finished run (weights or channels), recover, save a new run")
    p.add_argument("run", nargs="?", help="run folder to prune")
    p.add_argument("--method", choices=["unstructured", "structured"], default="structured",
                   help="unstructured: zero small weights (smaller zip, same dense speed); "
                        "structured: remove channels (smaller and faster)")
    p.add_argument("--amount", type=float, default=0.3,
                   help="fraction of weights (unstructured) or channels per layer (structured)")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank weights/channels across all layers instead of within each layer")
    p.add_argument("--steps", type=number(int, 1), default=1, help="prune-then-recover rounds to reach --amount")
    p.add_argument("--finetune-epochs", type=number(int, 0), default=1, help="recovery epochs after each step")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=1e-4, help="learning rate of the recovery fine-tune")
    p.add_argument("--batch-size", type=number(int, 1), help="default: the run's")
    p.add_argument("--round-to", type=number(int, 1), help="structured: channel counts multiple of N (1: any; "
                   "default 16, 8 or 1 by the narrowest pruned layer: ONNX Runtime's kernels run 8 or 16 channels at once)")
    p.add_argument("--channels", choices=["all", "inner"], default="all",
                   help="structured: inner prunes only channels inside blocks (expansion, depthwise, "
                        "bottleneck middles) and keeps the widths that residual adds tie together")
    p.add_argument("--distill", type=number(float, 0, 1), default=0.0, metavar="ALPHA",
                   help="recover by distillation from the unpruned model (weight ALPHA, rest on labels)")
    p.add_argument("--importance", choices=["taylor", "magnitude"], default="taylor",
                   help="structured: rank channels by |weight x gradient| on training images, or by weight norm")
    p.add_argument("--calibrate", type=number(int, 0), default=2000, metavar="N",
                   help="training images that re-estimate BatchNorm statistics after each step, kept "
                        "where validation accuracy does not drop (0: off)")
    p.add_argument("--bn", choices=["eval", "train"], default="eval",
                   help="BatchNorm in recovery: eval keeps the recalibrated statistics, train uses batch ones")
    p.add_argument("--transfer", metavar="PATH",
                   help="with --distill: unlabeled images (a folder, or a data set's training images) "
                        "that the unpruned model labels for the recovery")
    p.add_argument("--transfer-max", type=number(int, 1), metavar="N", help="use at most N transfer images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="parent folder of the new run (default: beside RUN)")
    p.add_argument("--name", help="new run folder name (default: RUN-pruned-METHODPCT)")
    p.add_argument("--resume", metavar="PRUNED_RUN",
                   help="continue a killed `graft prune` from its last completed epoch or step, with "
                        "the source run and settings it started with")

    d = sub.add_parser("distill", help="train a student run taught by a teacher run (knowledge distillation)",
                       description="Knowledge distillation: the student trains on hard labels and on "
                                   "the teacher's softened predictions. Takes every `graft train` flag.")
    add_train_flags(d)  # every `graft train` flag, for the student's own run
    d.add_argument("--teacher", metavar="RUN", help="finished run whose predictions teach the student")
    d.add_argument("--no-teacher", action="store_true",
                   help="baseline: the same student and budget, hard labels only (alpha 0)")
    d.add_argument("--student", metavar="BACKBONE", help="student backbone (same as --backbone)")
    d.add_argument("--temperature", type=number(float, 0, low_open=True), default=4.0, help="softening temperature T")
    d.add_argument("--alpha", type=number(float, 0, 1), default=0.7,
                   help="weight of the teacher term; 1-alpha goes to hard-label cross-entropy")
    d.add_argument("--transfer", metavar="PATH",
                   help="unlabeled images (any folder, or a data set: its training images) that the "
                        "teacher labels for the student; the run's own train/val/test images are left out")
    d.add_argument("--transfer-max", type=number(int, 1), metavar="N", help="use at most N transfer images")
    return {"prune": cmd_prune, "distill": cmd_distill}


def cmd_prune(args) -> None:
    from ..errors import GraftError
    from .prune import PruneSettings, prune_run
    if args.resume:
        if args.run:
            raise GraftError("--resume continues a pruned run with the source and settings it started "
                             f"with: give no RUN (got {args.run})")
        print(prune_run(None, None, resume=args.resume))
        return
    if not args.run:
        raise GraftError("graft prune: give the RUN folder to prune (or --resume PRUNED_RUN)")
    settings = PruneSettings(args.method, args.amount, args.global_pruning, args.steps, args.finetune_epochs,
                             args.lr, args.batch_size, args.round_to, args.distill,
                             seed=args.seed, importance=args.importance,
                             calibrate=args.calibrate, bn=args.bn, transfer=args.transfer,
                             transfer_max=args.transfer_max, channels=args.channels)
    print(prune_run(args.run, settings, args.out, args.name))


def cmd_distill(args) -> None:
    from .. import config
    from ..errors import GraftError
    from .distill import DistillSettings, distill
    if args.resume:
        print(distill(None, None, resume=args.resume))
        return
    if args.student:
        if args.backbone and args.backbone != args.student:
            raise GraftError("--student and --backbone name different backbones: give one")
        args.backbone = args.student
    if not args.teacher and not args.no_teacher:
        raise GraftError("distill needs --teacher RUN (or --no-teacher for the hard-label baseline)")
    if args.teacher and args.no_teacher:
        raise GraftError("--teacher and --no-teacher exclude each other")
    settings = DistillSettings(args.teacher, args.temperature, 0.0 if args.no_teacher else args.alpha,
                               args.transfer, args.transfer_max)
    cfg = config.resolve(args.config, train_overrides(args))
    print(distill(cfg, settings))
