"""The search folder's plots (optimisation history, parameter importance, accuracy against latency)
and its report.html: self-contained like a run's report, with the same look. Drawn from the rows of
trials.json and search.json's summary, so that what the report shows is what those files hold."""
from __future__ import annotations

import math
import warnings
from html import escape
from pathlib import Path

import yaml

from ..io import atomic_write_text
from ..report.html import _CSS, _figure, _table
from ..report.plots import _save, plt

_EXTRA_CSS = """
.card .note { color: var(--muted); font-size: 12px; }
table.tail td, table.tail th { white-space: nowrap; }
table.tail td:nth-last-child(-n+2), table.tail th:nth-last-child(-n+2) { text-align: left; white-space: normal; }
table.trials td:nth-child(-n+3), table.trials th:nth-child(-n+3), table.labelled td:nth-child(4),
table.labelled th:nth-child(4), table.front td:nth-child(2), table.front th:nth-child(2) { text-align: left; }
p.warn { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px; }
"""


def _legend_outside(ax) -> None:
    # beside the axes, never over a point; bbox_inches="tight" keeps it in the picture
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)


def _label(ax, text: str, xy) -> None:
    # below and to the left of a point in the right half, so the box stays inside the axes
    lo, hi = ax.get_xlim()
    x = xy[0]
    frac = (math.log(x / lo) / math.log(hi / lo)) if ax.get_xscale() == "log" and x > 0 and lo > 0 else (x - lo) / (hi - lo)
    left = frac > 0.5
    ax.annotate(text, xy, xytext=(-9 if left else 9, -14), textcoords="offset points", fontsize=8.5, zorder=7,
                ha="right" if left else "left", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.6", alpha=0.9))


def plot_history(rows: list[dict], limited: bool, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(9, 4.2))
    best, xs, ys = -math.inf, [], []
    for r in rows:  # in trial order
        if r["state"] == "COMPLETE" and r.get("feasible", True):
            best = max(best, r["val_acc"])
            xs.append(r["number"]), ys.append(best)
    if xs:
        xs.append(rows[-1]["number"]), ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="C2", lw=1.8, label="best so far" + " within the limit" * limited)
    styles = {"complete": dict(marker="o", color="C0"),
              "complete, over the latency limit": dict(marker="o", color="0.55", mfc="none"),
              "pruned (last report)": dict(marker="v", color="C1")}
    group = lambda r: ("complete" if r.get("feasible", True) else "complete, over the latency limit") \
        if r["state"] == "COMPLETE" else "pruned (last report)" if r["state"] == "PRUNED" else None
    for name, style in styles.items():
        shown = [(r["number"], r["val_acc"]) for r in rows if group(r) == name and r["val_acc"] is not None]
        if shown:
            ax.plot(*zip(*shown), ls="none", ms=7, label=name, **style)
    failed = [r["number"] for r in rows if r["state"] == "FAIL"]
    if failed:  # no value to place them by: along the bottom edge
        ax.plot(failed, [0.03] * len(failed), "x", color="C3", ms=8, mew=2, ls="none",
                transform=ax.get_xaxis_transform(), label="failed (no value)")
    for r in rows:
        if r.get("label") and r["val_acc"] is not None:
            _label(ax, r["label"], (r["number"], r["val_acc"]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    lo, hi = ax.get_ylim()
    if hi - lo < 0.02:  # one value, or all alike: a readable band, not float noise magnified
        ax.set_ylim((lo + hi) / 2 - 0.05, (lo + hi) / 2 + 0.05)
    ax.set(xlabel="trial", ylabel="validation accuracy", title="Optimisation history")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def plot_importances(study, path: Path) -> str | None:
    """A bar per parameter; returns why there is no plot instead, when there is none."""
    import optuna
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    varying = {p for t in done for p in t.params if len({repr(d.params.get(p)) for d in done}) > 1}
    if len(done) < 2 or not varying:
        return "no parameter importance: it needs at least two complete trials whose parameters differ"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Optuna's default evaluator ranks for low targets: negate to rank for high accuracy
            found = optuna.importance.get_param_importances(study, target=lambda t: -t.values[0])
    except Exception as e:  # noqa: BLE001 -- degenerate studies raise many kinds; a note, not a lost report
        return f"no parameter importance: {type(e).__name__}: {e}"
    if not found or any("will be equal" in str(w.message) for w in caught):
        return "no parameter importance: too few complete trials to tell the parameters apart"
    if len(found) < 2:  # normalised to sum to 1, a lone parameter always gets all of it
        return f"no parameter importance: only {next(iter(found), 'one parameter')} was searched over"
    names = list(found)[::-1]  # most important on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.38 * len(names)))
    bars = ax.barh(names, [found[n] for n in names], color="C0")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    ax.set_xlim(0, max(found.values()) * 1.15 or 1)
    ax.set(xlabel="importance for validation accuracy (sums to 1)",
           title=f"Parameter importance ({len(done)} complete trials, PED-ANOVA)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return None


def plot_pareto(rows: list[dict], settings, best: int | None, path: Path) -> Path | None:
    objectives, limit, multi = settings.objectives, settings.max_latency_ms, len(settings.objectives) > 1
    # with latency among the objectives (or nothing besides accuracy) the x axis is latency, else the other one
    xn = "latency_ms" if "latency_ms" in objectives or not multi else objectives[1]
    points = [r for r in rows if r["state"] == "COMPLETE" and r.get(xn) is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.scatter([r[xn] for r in points], [r["val_acc"] for r in points], s=28, color="0.7", label="trial", zorder=2)
    # the staircase: fastest first, each step a trial more accurate than every faster (feasible) one
    stairs, top = [], -math.inf
    for r in sorted((r for r in points if r.get("feasible", True)), key=lambda r: (r[xn], -r["val_acc"])):
        if r["val_acc"] > top:
            stairs.append(r)
            top = r["val_acc"]
    front = [r for r in points if r.get("pareto")] if multi else stairs
    if stairs:
        ax.step([r[xn] for r in stairs], [r["val_acc"] for r in stairs], where="post", color="C3", lw=1.5, zorder=3)
    if front:
        ax.scatter([r[xn] for r in front], [r["val_acc"] for r in front], s=55, color="C3", zorder=4,
                   label="Pareto front" if multi else "accuracy-latency front")
    for r in points:
        if r["number"] == best:
            ax.scatter([r[xn]], [r["val_acc"]], s=220, facecolors="none", edgecolors="k", lw=1.5, zorder=5,
                       label="best.yaml (most accurate" + (" within the limit)" if limit else ")"))
    labelled = [r for r in points if r.get("label")]
    if labelled:
        ax.scatter([r[xn] for r in labelled], [r["val_acc"] for r in labelled], s=200, marker="*", color="C1",
                   edgecolors="k", lw=0.6, zorder=6, label="labelled trial")
    for r in labelled:
        _label(ax, r["label"], (r[xn], r["val_acc"]))
    xs = [r[xn] for r in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        from matplotlib.ticker import FuncFormatter, LogLocator
        ax.set_xscale("log")  # "0.5, 1, 2, 5 ms" rather than powers of ten
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    if limit is not None and xn == "latency_ms":
        ax.axvline(limit, color="C3", ls="--", lw=1.2, label=f"max latency {limit:g} ms", zorder=1)
        ax.axvspan(limit, max(max(xs), limit) * 1.5, color="C3", alpha=0.06, zorder=0)
        ax.set_xlim(right=max(max(xs), limit) * (1.3 if ax.get_xscale() == "log" else 1.05))
    unit = {"latency_ms": f"latency (ms, batch {settings.latency_batch}, ONNX Runtime on CPU)",
            "size_mb": "model size (MB)"}[xn]
    ax.set(xlabel=unit, ylabel="validation accuracy",
           title=f"Validation accuracy against {'latency' if xn == 'latency_ms' else 'size'}")
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax)
    return _save(fig, path)


def _num(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _params(p: dict) -> str:
    # "lr=0.0031" for "train.lr": the section prefix only lengthens the cell
    return ", ".join(f"{k.split('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[-1]}={v}"
                     for k, v in p.items())


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]  # str.capitalize would lower the rest: names, units, errors


def _duration(s: float | None) -> str:
    return "—" if s is None else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def write_search_report(folder: Path, study, settings, summary: dict, rows: list[dict]) -> Path:
    """history.png, importance.png, pareto.png and report.html in the search folder; `rows` are
    trials.json's, `summary` is search.json's."""
    objectives, multi, selection = settings.objectives, len(settings.objectives) > 1, summary["selection"]
    images, notes = {}, []
    limited = settings.max_latency_ms is not None
    images["Validation accuracy per trial in trial order; the line is the best so far"
           + (" within the latency limit." if limited else ".")] = plot_history(rows, limited, folder / "history.png")
    note = plot_importances(study, folder / "importance.png")
    if note:
        notes.append(note)
        (folder / "importance.png").unlink(missing_ok=True)  # not last time's, from fewer trials
    else:
        images["How much each parameter mattered for validation accuracy (Optuna's default evaluator)."] = \
            folder / "importance.png"
    if (multi or any(r.get("latency_ms") is not None for r in rows)) and \
            plot_pareto(rows, settings, summary["best_trial"], folder / "pareto.png"):
        images["Grey: every complete trial. " + (f"Red: the Pareto front of {', '.join(objectives)}; the line joins "
               if multi else "Red, joined by the line: ") + "the most accurate model at each cost"
               + ("" if multi else " (only accuracy was optimised; the cost was measured)")
               + ". Stars: labelled trials. Ring: best.yaml. " + _cap(selection) + "."] = folder / "pareto.png"

    states = summary.get("states", {})
    arrows = ", ".join(f"{o} {'↑' if d == 'maximize' else '↓'}" for o, d in zip(objectives, settings.directions))
    cards = [("trials", str(summary["trials_done"]), f"{states.get('COMPLETE', 0)} complete, "
              f"{states.get('PRUNED', 0)} pruned, {states.get('FAIL', 0)} failed"),
             ("best validation accuracy", _num(summary["val_accuracy"]),
              f"trial {summary['best_trial']}" if summary["best_trial"] is not None else "no best trial"),
             ("test accuracy", _num(summary["test_accuracy"]),
              (f"trial {summary['best_trial']}: " if summary["best_trial"] is not None else "") + selection),
             ("search time", _duration(summary.get("trial_seconds")),
              f"trials' own time; {_duration(summary.get('span_seconds'))} from first start to last end"),
             ("objectives", arrows, f"max latency {settings.max_latency_ms:g} ms"
              if settings.max_latency_ms is not None else "no latency limit")]
    if multi:
        cards.insert(3, ("Pareto front", f"{len(summary['pareto'] or [])} trials",
                         "each scored on test once, after selection"))
    parts = [f"<h1>graftnet search {escape(Path(folder).name)}</h1>", '<div class="cards">']
    parts += [f'<div class="card"><div class="label">{escape(k)}</div><div class="value">{escape(v)}</div>'
              f'<div class="note">{escape(n)}</div></div>' for k, v, n in cards]
    parts.append("</div>")
    if summary.get("no_feasible"):
        parts.append(f'<p class="warn">{escape(_cap(summary["no_feasible"]))}.</p>')
    parts.append("<h2>Plots</h2>" + "".join(_figure(c, p) for c, p in images.items())
                 + "".join(f"<p>{escape(_cap(n))}.</p>" for n in notes))

    if multi:
        header = ["trial", "label", "validation acc", "test acc", "latency ms", "size MB", "run", "params"]
        table = [[p["number"], p.get("label") or "", _num(p["val_acc"]), _num(p["test_accuracy"]),
                  _num(p["latency_ms"], 2), _num(p["size_mb"], 2), Path(p["run"]).name if p["run"] else "—",
                  _params(p["params"])] for p in summary["pareto"] or []]
        parts += ["<h2>Pareto front</h2>", f"<p>Trials no other feasible trial beats on every objective "
                  f"({escape(arrows)}), most accurate first. {escape(_cap(selection))}: the test accuracy "
                  f"played no part in choosing them.</p>",
                  _table(header, table, css_class="tail front") if table else "<p>Empty: no feasible trial.</p>"]

    units = {"latency_ms": ("latency ms", 2), "size_mb": ("size MB", 2)}
    measured = [k for k in units if any(r.get(k) is not None for r in rows)]
    labelled = any(r.get("label") for r in rows)
    header = ["trial", "state", "", *["label"] * labelled, "validation acc", *[units[k][0] for k in measured],
              "seconds", "params", "error"]
    table = []
    for r in rows:
        mark = ("best" if r["number"] == summary["best_trial"] else "front" if r.get("pareto")
                else "over limit" if r.get("feasible") is False and r["state"] == "COMPLETE" else "")
        table.append([r["number"], r["state"].lower(), mark, *[r.get("label") or ""] * labelled, _num(r["val_acc"]),
                      *[_num(r.get(k), units[k][1]) for k in measured], _num(r["seconds"], 1),
                      _params(r["params"]), r["error"] or ""])
    parts += ["<h2>Trials</h2>", _table(header, table, css_class="tail trials" + " labelled" * labelled)]

    best_yaml = Path(folder) / "best.yaml"
    parts += ["<h2>Best config (best.yaml)</h2>",
              f"<pre>{escape(best_yaml.read_text())}</pre>" if summary["best_trial"] is not None and best_yaml.is_file()
              else "<p>None: no trial was chosen.</p>",
              "<h2>Search space</h2>", f"<pre>{escape(yaml.safe_dump(summary['space'], sort_keys=False))}</pre>",
              "<h2>Command</h2>", f"<pre>{escape(summary['command'] or '(called from Python)')}</pre>"]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>graftnet search {escape(Path(folder).name)}</title><style>{_CSS}{_EXTRA_CSS}</style></head>\n"
            f"<body><main>\n" + "\n".join(parts) + "\n</main></body></html>\n")
    return atomic_write_text(Path(folder) / "report.html", page)
