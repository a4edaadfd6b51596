"""Ensembles of finished runs: average the members' class probabilities, optionally weighted.

    graft ensemble runs/a runs/b runs/c --data DATA [--weighted] [--tta] [--out runs] [--name ens]

Each member preprocesses the raw images itself (own backbone, input size, mean and std), so members
may differ in all of these; they must share the class list. The ensemble's logits are the log of the
averaged probabilities, so softmax gives the average back and argmax is the ensemble's vote.

Weights (--weighted) minimise the ensemble's negative log-likelihood on the validation split, over
the probability simplex (w = softmax(a), fitted with L-BFGS). The mixture's NLL is convex in w, so
this finds the best weights without a grid, and it needs only M - 1 free numbers: little room to
overfit a validation split of a few hundred images. Without --weighted the weights are equal.
With --tta every member scores each image and its mirror (flip test-time augmentation) when the
ensemble is weighted, tested, and whenever it is loaded again: the saved ensemble predicts and serves
the way it was scored.

The ensemble is saved as a run folder: ensemble.json (members, weights, their accuracies),
config.yaml (its data section defines the splits; the rest is the first member's, and a comment on
top says so), test metrics and report.html, which `graft evaluate`, `graft predict` and `graft serve`
accept like any run.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .data.decoded import decode_split
from .data.images import ImageSet, config_splits
from .data.labels import open_data
from .errors import DataError, GraftError
from .io import atomic_write_json
from .multilabel import choose_thresholds, mean_ap
# Scoring and loading a saved ensemble live in predictor.py (load_predictor opens either kind of
# folder without importing this module); combine and load_ensemble are still importable from here.
from .predictor import (ENSEMBLE_FILE, EnsemblePredictor, RunPredictor, check_classes,  # noqa: F401
                        combine, flip_tta, load_ensemble, load_predictor)
from .progress import console, log

ENSEMBLE_CONFIG_NOTE = f"""\
An ensemble's config. Only `data` (the splits it was weighted and tested on), `cache_dir` and
`eval` apply to it; the rest is copied from its first member. Each member's own model and training
settings are in that member's config.yaml; {ENSEMBLE_FILE} lists the members and their weights."""


def fit_weights(member_logits: list[torch.Tensor], labels: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Simplex weights minimising the mixture's validation NLL (w = softmax(a), L-BFGS from equal)."""
    logp = torch.stack([l.float().log_softmax(1) for l in member_logits]).detach()
    picked = logp[:, torch.arange(len(labels)), labels]          # members x images
    a = torch.zeros(len(member_logits), requires_grad=True)
    opt = torch.optim.LBFGS([a], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -torch.logsumexp(picked + a.log_softmax(0).view(-1, 1), 0).mean()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return a.detach().softmax(0)


def ensemble_logits(ensemble: str | Path | list[str | Path], images: ImageSet,
                    batch_size: int = 128) -> torch.Tensor:
    """The ensemble's logits (log of the weighted average of the members' probabilities) for an
    ImageSet: an ensemble folder, or a list of run folders averaged with equal weights. The
    ImageSet's images should be kept at least at the largest member's input size."""
    if isinstance(ensemble, (list, tuple)):
        members = [load_predictor(p) for p in ensemble]
        predictor = EnsemblePredictor(members, torch.full((len(members),), 1 / len(members)))
    else:
        predictor = load_predictor(ensemble)
        if isinstance(predictor, RunPredictor):
            raise GraftError(f"{ensemble}: a single run, not an ensemble folder ({ENSEMBLE_FILE} missing)")
    return predictor.logits(images, batch_size, "ensemble")


def save_unscored(runs: list[str | Path], run_dir: str | Path) -> Path:
    """An ensemble folder of `runs` with equal weights that no split has scored: what a teacher needs
    (`graft auto` distils an ensemble it chose on validation and scores only the file it ships)."""
    from .config import resolve, save_yaml
    if len(runs) < 2:
        raise GraftError("an ensemble needs at least two runs")
    members = [load_predictor(r) for r in runs]
    check_classes(members)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(resolve(Path(runs[0]) / "config.yaml"), run_dir / "config.yaml", ENSEMBLE_CONFIG_NOTE)
    atomic_write_json(run_dir / ENSEMBLE_FILE, {
        "method": "equal weights", "tta": False, "data": members[0].cfg.data.path, "classes": members[0].classes,
        "members": [_member_entry(run_dir, m, 1 / len(runs)) for m in members]})
    return run_dir


def _check_data_configs(members: list) -> None:
    """Members split the data differently: one member's training images may be another's test."""
    keys = ("val_fraction", "test_fraction", "split_seed", "max_per_class")
    first = {k: getattr(members[0].cfg.data, k) for k in keys}
    for m in members[1:]:
        other = {k: getattr(m.cfg.data, k) for k in keys}
        if other != first:
            log(f"[yellow]warning: {m.run_dir} split its data with {other}, {members[0].run_dir} with "
                f"{first}; the ensemble uses the latter, so test or validation images of one may have "
                "trained another[/]")


def build_ensemble(runs: list[str | Path], data: str | None = None, weighted: bool = False,
                   out: str | Path = "runs", name: str | None = None, batch_size: int = 128,
                   tta: bool = False) -> Path:
    """Score every member on the data's validation and test splits, weight, report, save a run
    folder. `tta`: every member also scores each image's mirror, now and whenever it is loaded."""
    from .evaluation import finish_evaluation
    from .run import create_run, run_scope
    if len(runs) < 2:
        raise GraftError("an ensemble needs at least two runs")
    members = [flip_tta(load_predictor(r)) if tta else load_predictor(r) for r in runs]
    check_classes(members)
    multilabel = members[0].spec.multilabel
    if multilabel and weighted:
        raise GraftError("--weighted fits weights to the members' softmax likelihood; the members are "
                         "multi-label runs: leave --weighted out (equal weights)")
    _check_data_configs(members)
    cfg = copy.deepcopy(members[0].cfg)
    cfg.data.path = str(data or cfg.data.path)
    source = open_data(cfg.data, cfg.cache_dir)
    if source.classes != members[0].classes:
        raise DataError(f"{cfg.data.path}: classes {source.classes} differ from the members' "
                        f"{members[0].classes}")
    splits = config_splits(source, cfg.data)
    size = max(m.image_size for m in members)
    load = lambda s: decode_split(source, splits[s], size, cfg.data, cfg.cache_dir)  # noqa: E731
    if weighted:  # validation first: an empty split stops here, before the long test pass
        if not splits["val"]:
            raise DataError(f"{cfg.data.path}: --weighted needs a validation split, and this one is "
                            "empty (data.val_fraction is 0 in the first member's config)")
        val = load("val")
        weights = fit_weights([m.logits(val, batch_size, "val") for m in members], val.labels)
    else:
        weights = torch.full((len(members),), 1 / len(members))
    thresholds = None
    if multilabel and splits["val"]:  # the averaged probabilities' own thresholds, as a run chooses them
        val = load("val")
        thresholds = choose_thresholds(combine([m.logits(val, batch_size, "val") for m in members], weights, True),
                                       val.labels)
    test = load("test")
    test_logits = [m.logits(test, batch_size, "test") for m in members]
    ensemble = EnsemblePredictor(members, weights, None, cfg, thresholds)
    logits = combine(test_logits, weights, multilabel)
    # the table's score: test accuracy, or for multi-label runs mAP
    accuracy = (lambda l: mean_ap(l, test.labels)) if multilabel else \
        (lambda l: (l.argmax(1) == test.labels).sum().item() / max(1, len(test)))  # noqa: E731
    accs = [accuracy(l) for l in test_logits]
    _print_table(members, weights, accs, accuracy(logits), tta, "test mAP" if multilabel else "test accuracy")

    run_dir = create_run(out, name, "ensemble", cfg, cfg.train.seed, header=ENSEMBLE_CONFIG_NOTE)
    with run_scope(run_dir, keep_if=ENSEMBLE_FILE):
        ensemble.run_dir = run_dir
        _save(run_dir, cfg, ensemble, members, weights, accs, weighted, tta)
        cards = {"test-time augmentation": "flip (every member: image and mirror, logits averaged)"} if tta else None
        finish_evaluation(run_dir, cfg, ensemble.spec, [], logits, test.labels, test, None, cards=cards)
    return run_dir


def _save(run_dir: Path, cfg, ensemble, members, weights, accs, weighted: bool, tta: bool) -> None:
    atomic_write_json(run_dir / ENSEMBLE_FILE, {
        "method": "weights minimise validation NLL" if weighted else "equal weights", "tta": tta,
        "data": cfg.data.path, "classes": ensemble.classes,
        **({"multilabel": True, "thresholds": ensemble.spec.thresholds} if ensemble.multilabel else {}),
        "members": [{**_member_entry(run_dir, m, w), "test_map" if ensemble.multilabel else "test_accuracy": a}
                    for m, w, a in zip(members, weights, accs)]})


def _member_entry(run_dir: Path, member, weight: float) -> dict:
    """A member as ensemble.json lists it: its folder relative to the ensemble's (load_ensemble tries
    that first) and absolute, its weight, backbone and input size."""
    return {"path": os.path.relpath(Path(member.run_dir).resolve(), run_dir.resolve()),
            "absolute": str(Path(member.run_dir).resolve()), "weight": float(weight),
            "backbone": member.spec.backbone, "image_size": member.image_size}


def _print_table(members, weights, accs, ensemble_acc, tta: bool = False, score: str = "test accuracy") -> None:
    from rich.table import Table
    table = Table(title=f"ensemble: {score}" + " (each image and its mirror)" * tta)
    for col in ("member", "backbone", "input", "weight", score):
        table.add_column(col, justify="right" if col in ("weight", score) else "left")
    for m, w, a in zip(members, weights, accs):
        table.add_row(Path(m.run_dir).name, m.spec.backbone, f"{m.image_size}px", f"{float(w):.3f}", f"{a:.4f}")
    table.add_row("[bold]ensemble[/]", "", "", "1.000", f"[bold]{ensemble_acc:.4f}[/]")
    console.print(table)


def add_commands(sub) -> dict:
    p = sub.add_parser("ensemble", help="average finished runs' probabilities; save as a run folder")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--data", help="data to weight and test on (default: the first member's)")
    p.add_argument("--weighted", action="store_true",
                   help="fit weights minimising validation NLL (default: equal weights)")
    p.add_argument("--tta", action="store_true", help="every member scores each image and its mirror and "
                   "averages the logits, here and whenever the ensemble predicts or serves")
    p.add_argument("--out", default="runs", help="parent folder of the ensemble's run folder")
    p.add_argument("--name", help="run folder name (default ensemble-<time>)")

    def cmd_ensemble(args) -> None:
        print(build_ensemble(args.runs, args.data, args.weighted, args.out, args.name, tta=args.tta))
    return {"ensemble": cmd_ensemble}
