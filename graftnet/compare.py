"""Is one model really better than another on the same test images? A paired comparison.

    graft compare runs/a runs/b/evaluations/cifar10-jpeg-tta

Two accuracies on 10,000 images each carry about +-0.5 points of sampling error, but when both
models score the same images most of that error is shared: what decides is the images on which they
disagree. This reads each side's test_predictions.csv (a run folder, an evaluation folder or the
file itself), pairs the rows by file, counts the images only A gets right and only B gets right,
and gives McNemar's exact test on those counts (two-sided binomial test, p = 0.5) and a 95%
interval of the accuracy difference B - A (paired, normal approximation).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from .errors import GraftError
from .metrics import Z95, wilson_interval
from .progress import make_console

PREDICTIONS = "test_predictions.csv"


def read_predictions(path: str | Path) -> dict[str, tuple[str, bool]]:
    """file -> (true class, correct) from a test_predictions.csv, or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / PREDICTIONS
    if not path.is_file():
        raise GraftError(f"{path}: not found; runs and `graft evaluate` write {PREDICTIONS} "
                         "(runs finished before graftnet wrote it: evaluate them again)")
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        # a multi-label run's file has "exact" (every label right) where others have "correct"
        out = {r["file"]: (r["true"], r["correct" if "correct" in r else "exact"] == "1") for r in rows if r["true"]}
    except (KeyError, csv.Error, UnicodeDecodeError) as e:
        raise GraftError(f"{path}: not a graftnet predictions file ({e})") from None
    if not out:
        raise GraftError(f"{path}: no labeled rows")
    return out


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | each discordant image is a
    fair coin). Exact integer binomial sums, so thousands of discordant images are fine."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def compare(a: str | Path, b: str | Path) -> dict:
    pa, pb = read_predictions(a), read_predictions(b)
    if pa.keys() != pb.keys():
        only_a, only_b = sorted(pa.keys() - pb.keys()), sorted(pb.keys() - pa.keys())
        raise GraftError(f"{a} and {b} scored different images ({len(only_a)} only in the first, "
                         f"e.g. {only_a[:1]}; {len(only_b)} only in the second, e.g. {only_b[:1]}): "
                         "compare evaluations on the same test split")
    wrong_label = [f for f in pa if pa[f][0] != pb[f][0]]
    if wrong_label:
        raise GraftError(f"{a} and {b} disagree on the true class of {len(wrong_label)} images, "
                         f"e.g. {wrong_label[0]}: {pa[wrong_label[0]][0]} against {pb[wrong_label[0]][0]}")
    n = len(pa)
    both = sum(pa[f][1] and pb[f][1] for f in pa)
    only_a = sum(pa[f][1] and not pb[f][1] for f in pa)
    only_b = sum(pb[f][1] and not pa[f][1] for f in pa)
    diff = (only_b - only_a) / n
    se = math.sqrt(max(0.0, only_a + only_b - (only_b - only_a) ** 2 / n)) / n
    return {"a": str(a), "b": str(b), "n": n, "accuracy_a": (both + only_a) / n,
            "accuracy_b": (both + only_b) / n, "both_right": both, "only_a_right": only_a,
            "only_b_right": only_b, "both_wrong": n - both - only_a - only_b,
            "difference": diff, "difference_ci95": [diff - Z95 * se, diff + Z95 * se],
            "mcnemar_p": mcnemar_exact(only_a, only_b)}


def label(path: str | Path) -> str:
    """A short name: the run folder's, with the evaluation's (runs/a/evaluations/x -> "a: x")."""
    path = Path(path)
    if path.name == PREDICTIONS:
        path = path.parent
    if path.parent.name == "evaluations":
        return f"{path.parent.parent.name}: {path.name}"
    return path.name


def print_comparison(r: dict) -> None:
    from rich.table import Table
    console = make_console(highlight=False)  # the result: stdout, unlike progress and logs
    table = Table(title=f"paired comparison on {r['n']} test images")
    for col in ("", "model", "accuracy", "95% CI", "only it right"):
        table.add_column(col, justify="left" if col in ("", "model") else "right")
    for side in ("a", "b"):
        lo, hi = wilson_interval(r["both_right"] + r[f"only_{side}_right"], r["n"])
        table.add_row(side.upper(), label(r[side]), f"{r[f'accuracy_{side}']:.4f}", f"{lo:.4f}-{hi:.4f}",
                      str(r[f"only_{side}_right"]))
    console.print(table)
    lo, hi = r["difference_ci95"]
    verdict = "a real difference at the 5% level" if r["mcnemar_p"] < 0.05 else \
        "not distinguishable at the 5% level"
    console.print(f"B - A: {100 * r['difference']:+.2f} points (95% CI {100 * lo:+.2f} to {100 * hi:+.2f}); "
                  f"both right {r['both_right']}, both wrong {r['both_wrong']}; "
                  f"McNemar exact p = {r['mcnemar_p']:.3g}: {verdict}")


def add_commands(sub) -> dict:
    p = sub.add_parser("compare", help="paired test of two models on the same test images (McNemar)")
    p.add_argument("a", metavar="A", help=f"run folder, evaluation folder or {PREDICTIONS}")
    p.add_argument("b", metavar="B", help="the same for the other model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def cmd_compare(args) -> None:
        import json
        r = compare(args.a, args.b)
        if args.json:
            print(json.dumps(r))
        else:
            print_comparison(r)
    return {"compare": cmd_compare}
