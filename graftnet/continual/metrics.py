"""Continual-learning metrics from an accuracy matrix, as Avalanche defines them.

`R[j][i]` is the accuracy on task i after training through task j (T x T; NaN/None where not evaluated).
`s[i]` are the test sizes (equal weights without them); "the accuracy over tasks S after step j" is the
`s`-weighted mean of `R[j][i]` over the evaluated i in S, i.e. the accuracy over all their test samples,
as Avalanche's StreamAccuracy / TrainedExperienceAccuracy (accuracy.py) count it.

- final_acc: accuracy over all tasks after the last step (StreamAccuracy at the end of the stream).
- acc_per_step[j]: accuracy over tasks 0..j after step j (TrainedExperienceAccuracy).
- avg_incremental_acc: mean of acc_per_step over steps (iCaRL, DER "average incremental accuracy").
- forgetting: mean over i < T-1 of R[i][i] - R[T-1][i], unweighted (Avalanche's StreamForgetting,
  forgetting_bwt.py: accuracy right after training a task minus the latest one, averaged with weight 1).
- bwt: -forgetting (forgetting_to_bwt); with every entry present this is GEM's BWT
  (Lopez-Paz & Ranzato 2017): 1/(T-1) sum_{i<T-1} R[T-1][i] - R[i][i].
- forgetting_max: Chaudhry et al. 2018 (RWalk): mean over i < T-1 of max_{i<=l<T-1} R[l][i] - R[T-1][i].
  The paper maximises over every earlier step; steps before task i was trained are left out here,
  since its accuracy there measures transfer, not something learned and then lost. Per task >= forgetting.
- fwt: mean over i >= 1 of R[i-1][i] - initial[i], `initial` being the untrained model's accuracy
  (Avalanche's StreamForwardTransfer, forward_transfer.py; the same as GEM's FWT with b = initial).
  Without `initial` it is None: other papers' FWT (e.g. the mean of the upper triangle of R, Diaz-Rodriguez
  et al. 2018) carries no baseline and is a different number, so it is not substituted.

A class-incremental run also passes its within-task matrix (each task's rows scored among its own
classes only; learner.score_within) through `summarize`: "forgetting within task" is its forgetting.

Undefined is None, never 0 or NaN. Avalanche's Mean (mean.py) returns 0.0 when nothing was averaged, so
its stream forgetting, BWT and forward transfer read 0.0 after the first experience and on a one-experience
stream. Here forgetting, forgetting_max and bwt are None for T = 1 and for the last task, fwt is None for
task 0 and for T = 1, and means skip missing entries instead of letting a NaN through.
"""
from __future__ import annotations

import math
from numbers import Real

import numpy as np

def _acc(value, where: str) -> float:
    if value is None:
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is not a number: {value!r}") from None
    if not math.isnan(x) and not 0.0 <= x <= 1.0:
        raise ValueError(f"{where} = {x} is outside [0, 1] (accuracies are fractions, not percent)")
    return x


def _matrix(matrix) -> np.ndarray:
    try:
        rows = list(matrix)
    except TypeError:
        raise ValueError(f"matrix must be a list of rows, not {type(matrix).__name__}") from None
    t = len(rows)
    if t == 0:
        raise ValueError("matrix is empty: it needs one row per task")
    for j, row in enumerate(rows):
        try:
            rows[j] = row = list(row)
        except TypeError:
            raise ValueError(f"matrix row {j} is not a list of accuracies: {row!r}") from None
        if len(row) != t:
            raise ValueError(f"matrix row {j} has {len(row)} entries, but there are {t} rows: "
                             f"the matrix must be square, one column per task")
    return np.array([[_acc(v, f"matrix[{j}][{i}]") for i, v in enumerate(row)] for j, row in enumerate(rows)])


def _vector(values, t: int, name: str) -> list:
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a list with one entry per task, not {values!r}") from None
    if len(values) != t:
        raise ValueError(f"{name} has {len(values)} entries, but the matrix has {t} tasks")
    return values


def _mean(values, weights=None):
    values = np.asarray([math.nan if v is None else v for v in values], dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    ok = ~np.isnan(values)
    if not ok.any() or weights[ok].sum() == 0:
        return None
    return float(np.dot(values[ok], weights[ok]) / weights[ok].sum())


def _diff(a: float, b: float):
    return None if math.isnan(a) or math.isnan(b) else float(a - b)


def summarize(matrix, initial=None, sizes=None) -> dict:
    """Continual-learning metrics of one run; see the module docstring for the definitions."""
    r = _matrix(matrix)
    t = len(r)
    w = np.ones(t)
    if sizes is not None:
        w = np.zeros(t)
        for i, size in enumerate(_vector(sizes, t, "sizes")):
            try:
                w[i] = float(size)
            except (TypeError, ValueError):
                w[i] = math.nan
            if not w[i] >= 0:  # also catches NaN and what is not a number
                raise ValueError(f"sizes[{i}] = {size!r} must be a non-negative sample count")
    if initial is not None:
        initial = [_acc(v, f"initial[{i}]") for i, v in enumerate(_vector(initial, t, "initial"))]

    acc_per_step = [_mean(r[j, : j + 1], w[: j + 1]) for j in range(t)]
    per_task = []
    for i in range(t):
        # The last task has no later step to forget at; task 0 has no earlier step to transfer from.
        seen = r[i : t - 1, i][~np.isnan(r[i : t - 1, i])]
        per_task.append({
            "task": i,
            "final_acc": None if math.isnan(r[-1, i]) else float(r[-1, i]),
            "forgetting": _diff(r[i, i], r[-1, i]) if i < t - 1 else None,
            "forgetting_max": _diff(seen.max(), r[-1, i]) if seen.size else None,
            "fwt": _diff(r[i - 1, i], initial[i]) if initial is not None and i > 0 else None,
        })
    forgetting = _mean([p["forgetting"] for p in per_task])
    return {
        "tasks": t,
        "final_acc": _mean(r[-1], w),
        "avg_incremental_acc": _mean(acc_per_step),
        "forgetting": forgetting,
        "forgetting_max": _mean([p["forgetting_max"] for p in per_task]),
        "bwt": None if forgetting is None else -forgetting,
        "fwt": _mean([p["fwt"] for p in per_task]),
        "per_task": per_task,
        "acc_per_step": acc_per_step,
    }


def mean_sd(runs: list[dict], keys=None) -> dict:
    """Mean, sample sd (ddof=1) and count of each scalar metric over runs (seeds, task orders).

    A run whose value is None (or NaN, or absent) for a key is left out of that key, and n says how many
    were used; sd is None with fewer than two values, mean too with none.
    """
    if not runs:
        raise ValueError("mean_sd needs at least one run")
    if keys is None:
        keys = [k for k in dict.fromkeys(k for run in runs for k in run)
                if all(run.get(k) is None or isinstance(run[k], Real) for run in runs)]
    out = {}
    for key in keys:
        values = []
        for n, run in enumerate(runs):
            v = run.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, Real)):
                raise ValueError(f"runs[{n}][{key!r}] is not a number: {v!r}")
            if v is not None and not math.isnan(v):
                values.append(float(v))
        k = len(values)
        out[key] = {"mean": float(np.mean(values)) if k else None,
                    "sd": float(np.std(values, ddof=1)) if k > 1 else None, "n": k}
    return out
