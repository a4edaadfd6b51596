"""A continual run's pictures and pages: the accuracy matrix as a heatmap, accuracy over seen tasks
after each task per method, the methods' table (mean ± sd over seeds and task orders), report.html."""
from __future__ import annotations

from pathlib import Path

from ..report.html import write_report
from ..report.plots import _save, plt

# the table's columns: summary key -> heading (points: accuracies x 100)
COLUMNS = {"final_acc": "final acc", "avg_incremental_acc": "avg incr. acc", "forgetting": "forgetting",
           "bwt": "BWT", "fwt": "FWT"}
# class-incremental runs also keep these metrics of the within-task matrix (each task's rows among its
# own classes only; summary: methods.<name>.within_metrics); the table shows its forgetting beside the
# forgetting. Task-incremental runs have no such column: their matrix is within-task already.
WITHIN_KEYS = ["final_acc", "avg_incremental_acc", "forgetting", "forgetting_max", "bwt"]
WITHIN_COLUMN = ("forgetting", "forgetting within task")


def plot_matrix(matrix: list[list[float]], tasks: list[str], title: str, path: Path) -> Path:
    """Rows: after training task j; columns: accuracy on task i. Above the diagonal: tasks not yet
    learned."""
    n = len(tasks)
    fig, ax = plt.subplots(figsize=(0.85 * n + 2.4, 0.7 * n + 1.5))
    im = ax.imshow([[100 * v for v in row] for row in matrix], vmin=0, vmax=100, cmap="viridis")
    for j, row in enumerate(matrix):
        for i, v in enumerate(row):
            if v == v:
                ax.text(i, j, f"{100 * v:.1f}", ha="center", va="center", fontsize=9,
                        color="white" if v < 0.6 else "black", alpha=0.55 if i > j else 1)
    ax.set_xticks(range(n), [f"{t}" for t in tasks], rotation=30, ha="right")
    ax.set_yticks(range(n), [f"after {t}" for t in tasks])
    ax.set_xlabel("accuracy on task")
    ax.set_title(title, fontsize=11)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy %")
    return _save(fig, path)


def plot_steps(curves: dict[str, list[tuple[float, float]]], tasks: list[str], path: Path) -> Path:
    """Accuracy over the tasks seen so far after each task: (mean, sd) per step, one line per method."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    steps = range(1, len(tasks) + 1)
    for (name, points), marker in zip(curves.items(), "osD^vPX*hp" * 3):   # shapes tell overlapping lines apart
        mean = [100 * m for m, _ in points]
        sd = [100 * (s or 0) for _, s in points]
        line, = ax.plot(steps, mean, marker=marker, markersize=5, label=name)
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xticks(list(steps), [f"{i}\n{t}" for i, t in zip(steps, tasks)], fontsize=8)
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on tasks seen so far %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    return _save(fig, path)


def cell(stat: dict | None) -> str:
    """'84.2 ± 0.3' in points, or '—' for an undefined metric."""
    if not stat or stat.get("mean") is None:
        return "—"
    sd = stat.get("sd")
    return f"{100 * stat['mean']:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def _within(summary: dict) -> bool:
    return summary.get("scenario") == "class" and any("within_metrics" in m for m in summary["methods"].values())


def table_header(summary: dict) -> list[str]:
    """The metric columns' headings: COLUMNS, and class-incremental "forgetting within task" right
    after "forgetting"."""
    out = []
    for k, heading in COLUMNS.items():
        out.append(heading)
        if k == WITHIN_COLUMN[0] and _within(summary):
            out.append(WITHIN_COLUMN[1])
    return out


def table_rows(summary: dict) -> list[list]:
    rows = []
    for name, m in summary["methods"].items():
        cells = []
        for k in COLUMNS:
            cells.append(cell(m["metrics"].get(k)))
            if k == WITHIN_COLUMN[0] and _within(summary):
                cells.append(cell((m.get("within_metrics") or {}).get(k)))
        rows.append([name, *cells, f"{m['seconds']['mean']:.1f}", m["runs"]])
    return rows


def write_continual_report(folder: Path, summary: dict, config: dict, images: dict[str, Path]) -> Path:
    header = ["method", *table_header(summary), "seconds per run", "runs"]
    cards = {"scenario": f"{summary['scenario']}-incremental", "tasks": len(summary["tasks"]),
             "task orders": summary["orders"], "seeds": len(summary["seeds"]),
             "best final accuracy": summary.get("best", "—")}
    note = ("Accuracies in points (mean ± sd over seeds and task orders). Forgetting: accuracy on a task "
            "right after learning it minus at the end, averaged over all but the last task (Avalanche's "
            "definition); BWT = −forgetting; FWT: accuracy on a task before learning it minus the untrained "
            "model's. Seconds: training and scoring of one run, features already cached.")
    if _within(summary):
        note += (" Class-incremental, a task's images are scored among all classes seen so far, so its "
                 "forgetting also counts new classes outscoring its own (a cat now called a dog); "
                 "forgetting within task is the same measure with each task's images scored among its own "
                 "classes only, which counts knowledge lost.")
    return write_report(folder / "report.html", f"graftnet continual: {folder.name}", cards, config, [], None,
                        images, [], tables=[("Methods", note, header, table_rows(summary))], tables_first=True)
