"""One self-contained HTML report per run: inline CSS, images as data URIs, no scripts.

A single file can be mailed, archived or opened offline and still shows everything.
"""
from __future__ import annotations

import base64
import json
import math
from html import escape
from pathlib import Path

import yaml

from graftnet.io import atomic_write_text

_CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d8dee4; --card: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 32px 24px 64px; }
h1 { margin: 0 0 20px; font-size: 28px; }
h2 { margin: 40px 0 12px; font-size: 20px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 17px; font-weight: 600; overflow-wrap: break-word; }
figure { margin: 0 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; }
th { background: var(--card); font-weight: 600; }
th:first-child, td:first-child, table.text th, table.text td { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.total td { font-weight: 600; border-top: 2px solid var(--line); }
.scroll { overflow-x: auto; }
pre { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
      overflow-x: auto; font-size: 13px; }
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table(header: list[str], rows: list[list], total: list | None = None, css_class: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    if total is not None:
        body += '<tr class="total">' + "".join(f"<td>{escape(_fmt(v))}</td>" for v in total) + "</tr>"
    return (f'<div class="scroll"><table class="{css_class}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _figure(caption: str, path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():  # a plot that failed or was skipped should not sink the whole report
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def write_report(path: str | Path, title: str, summary: dict, config: dict, history: list[dict],
                 test: dict | None, images: dict[str, str | Path], classes: list[str],
                 environment: dict | None = None,
                 tables: list[tuple[str, str, list[str], list[list]]] = (), tables_first: bool = False) -> Path:
    """`tables`: extra (title, note, header, rows) sections after the test metrics, or right after
    the summary cards (`tables_first`: where the table is the result, as a comparison of methods)."""
    parts = [f"<h1>{escape(title)}</h1>", '<div class="cards">']
    parts += [f'<div class="card"><div class="label">{escape(str(k))}</div>'
              f'<div class="value">{escape(_fmt(v))}</div></div>' for k, v in summary.items()]
    parts.append("</div>")
    extra = []
    for name, note, header, rows in tables:
        extra += [f"<h2>{escape(name)}</h2>", f"<p>{escape(note)}</p>" if note else "", _table(header, rows)]
    if tables_first:
        parts += extra

    figures = [_figure(caption, p) for caption, p in images.items()]
    if any(figures):
        parts += ["<h2>Plots</h2>", *figures]

    if history:
        # Union of keys in first-seen order, so rows with extra fields still line up.
        columns = list(dict.fromkeys(k for row in history for k in row))
        parts += ["<h2>Training history</h2>",
                  _table(columns, [[row.get(c, "") for c in columns] for row in history])]

    if test is not None:
        top_k = ", ".join(f"{k} {v:.4f}" for k, v in test["top_k"].items())
        rows = [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]]
                for r in test["per_class"]]
        macro = test["macro"]
        ci = test.get("accuracy_ci95")
        ci = f" (95% CI {ci[0]:.4f}–{ci[1]:.4f})" if ci else ""
        line = f"n = {test['n']}, accuracy {test['accuracy']:.4f}{ci}, loss {test['loss']:.4f}, {top_k}"
        parts += [f"<h2>Test metrics</h2><p>{escape(line)}</p>",
                  _table(["class", "precision", "recall", "F1", "support"], rows,
                         total=["macro", macro["precision"], macro["recall"], macro["f1"], test["n"]])]

    if not tables_first:
        parts += extra

    if classes:
        parts += [f"<h2>Classes ({len(classes)})</h2>", f"<p>{escape(', '.join(map(str, classes)))}</p>"]

    # The JSON round trip turns Paths, tuples and the like into types safe_dump accepts.
    plain = json.loads(json.dumps(config, default=str))
    parts += ["<h2>Configuration</h2>",
              f"<pre>{escape(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))}</pre>"]

    if environment:
        rows = [[k, v] for k, v in environment.items()]
        parts += ["<h2>Environment</h2>", _table(["item", "value"], rows, css_class="text")]

    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body><main>\n" + "\n".join(parts) + "\n</main></body></html>\n")
    return atomic_write_text(path, page)
