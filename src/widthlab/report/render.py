"""Write ``DIR/report.html`` and ``DIR/report.md`` from the results database alone.

The report reads only ``DIR/results.sqlite`` (through :class:`ResultStore`), so ``widthlab report DIR``
re-renders it at any time, during a sweep or long after, without training. Its output depends only on
the database: no clock, no host name, so rendering twice gives the same bytes.

* ``report.html`` is self-contained: inline CSS, the plots embedded as ``data:image/png;base64`` URIs,
  no scripts and no external references, so it opens offline and can be mailed as one file.
* ``report.md`` has the same text and tables; its plots are the PNG files ``DIR/plots/<name>.png``,
  referenced by relative path (Markdown viewers cannot show embedded data URIs reliably). Files there
  that the current database no longer produces are left alone.

Every file is written atomically (temporary file in the same directory, then ``os.replace``), so a
reader never sees half a report, and a failed render leaves the previous one in place.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path

from widthlab.report.compare import compare_results, is_compare
from widthlab.report.compare_plots import compare_plots
from widthlab.report.compare_tables import COMPARE_NOTES, compare_table, task_notes
from widthlab.report.plots import Plot, _slug, make_plots
from widthlab.report.tables import (
    TEXT_COLUMNS,
    aggregate,
    failed_runs,
    markdown_table,
    status_counts,
    study_tables,
)
from widthlab.report.verdict import VERDICT_RULE, verdicts
from widthlab.studies.store import ResultStore

HTML_NAME = "report.html"
MD_NAME = "report.md"
PLOTS_DIR = "plots"
# Long tracebacks would drown the page; the full text stays in the database.
MAX_ERROR_CHARS = 2000

NOTES = ("Values are mean ± sample standard deviation (ddof=1) over the seeds of each group "
         "(– where a group has one finished run); accuracies in %. n counts finished runs. "
         "Width fraction (wide & sparse only) is (sparse − base) / (dense − base) of the headline "
         "metric, with dense the dense net of the same width and base the dense net at the family's "
         "base width; 1 means the sparse net gets all of the dense net's gain from width.")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1320px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
.status { color: #555; } .notes { color: #555; font-size: 0.9em; }
.verdict { background: #f4f8fb; border-left: 4px solid #1f77b4; padding: 0.2em 1em; font-size: 1.02em; }
.warn { color: #8a4b00; font-size: 0.92em; } .tasknote { color: #333; font-size: 0.92em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; white-space: nowrap; }
th { background: #f3f3f3; text-align: left; white-space: normal; vertical-align: bottom; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; max-width: 60em; }
td.err { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace;
         font-size: 0.85em; color: #a00; }
"""


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _status_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    parts = [f"{counts[k]} {k}" for k in ("done", "failed", "running", "pending")]
    parts += [f"{v} {k}" for k, v in counts.items() if k not in ("done", "failed", "running", "pending")]
    return f"{total} runs: " + ", ".join(parts) + "."


def _error_text(err: str) -> str:
    return err if len(err) <= MAX_ERROR_CHARS else err[:MAX_ERROR_CHARS] + " …"


def _title(studies: list[str]) -> str:
    return "widthlab report" + (f": {', '.join(studies)}" if studies else "")


def render_markdown(studies, counts, tables, plots: list[Plot], failed, comparison=(), verdict=()) -> str:
    """The Markdown report; plots referenced as ``plots/<name>.png``."""
    out = [f"# {_title(studies)}", "", _status_line(counts), ""]
    if verdict:
        out += ["## Verdict", ""]
        for line in verdict:
            out += [line, ""]
        out += [VERDICT_RULE, ""]
    if comparison:
        out += ["## Comparison", ""]
        for task, header, rows, notes in comparison:
            out += [f"### {task}", "", markdown_table(header, rows), ""]
            for note in notes:
                out += [note, ""]
        out += [COMPARE_NOTES, ""]
    out += ["## All runs" if comparison else "## Results", ""]
    for study, header, rows in tables:
        if len(tables) > 1:
            out += [f"### {study}", ""]
        out += [markdown_table(header, rows), ""]
    out += [NOTES if tables else "No finished runs yet.", ""]
    if plots:
        out += ["## Plots", ""]
        for p in plots:
            out += [f"### {p.title}", "", f"![{p.title}]({PLOTS_DIR}/{p.name}.png)", "", p.caption, ""]
    if failed:
        out += ["## Failed runs", ""]
        for f in failed:
            seed = f" (seed {f['seed']})" if f["seed"] is not None else ""
            err = _error_text(f["error"]).replace("\n", " ⏎ ")
            out += [f"- `{f['run_id']}` {f['label']}{seed}, study {f['study']}: {err}"]
        out += [""]
    return "\n".join(out)


def _is_warning(note: str) -> bool:
    return note.startswith(("Warning", "†")) or "not settled" in note


def _verdict_html(line: str) -> str:
    """A verdict paragraph with its task name in bold."""
    task, sep, rest = line.partition(": ")
    return f"<strong>{html.escape(task)}</strong>{sep}{html.escape(rest)}" if sep else html.escape(line)


def _html_table(header: list[str], rows: list[list[str]], text_cols: set[str]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = "".join(f'<td class="{"txt" if h in text_cols else "num"}">{e(c)}</td>'
                        for h, c in zip(header, r))
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def render_html(studies, counts, tables, plots: list[Plot], failed, comparison=(), verdict=()) -> str:
    """The self-contained HTML report (inline CSS, plots as data URIs, no scripts)."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(_title(studies))}</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(_title(studies))}</h1>", f'<p class="status">{e(_status_line(counts))}</p>']
    if verdict:
        out += ['<h2 id="verdict">Verdict</h2>', '<div class="verdict">']
        out += [f"<p>{_verdict_html(line)}</p>" for line in verdict]
        out += ["</div>", f'<p class="notes">{e(VERDICT_RULE)}</p>']
    if comparison:
        out += ['<h2 id="comparison">Comparison</h2>']
        for task, header, rows, notes in comparison:
            out += [f"<h3>{e(task)}</h3>", _html_table(header, rows, set(TEXT_COLUMNS))]
            out += [f'<p class="{"warn" if _is_warning(n) else "tasknote"}">{e(n)}</p>' for n in notes]
        out += [f'<p class="notes">{e(COMPARE_NOTES)}</p>']
    out += ["<h2>All runs</h2>" if comparison else "<h2>Results</h2>"]
    for study, header, rows in tables:
        if len(tables) > 1:
            out += [f"<h3>{e(study)}</h3>"]
        out += [_html_table(header, rows, set(TEXT_COLUMNS))]
    out += [f'<p class="notes">{e(NOTES)}</p>' if tables else "<p>No finished runs yet.</p>"]
    if plots:
        out += ["<h2>Plots</h2>"]
        for p in plots:
            data = base64.b64encode(p.png).decode("ascii")
            out += [f'<figure id="{e(p.name)}"><h3>{e(p.title)}</h3>',
                    f'<img src="data:image/png;base64,{data}" alt="{e(p.title)}">',
                    f"<figcaption>{e(p.caption)}</figcaption></figure>"]
    if failed:
        out += ["<h2>Failed runs</h2>"]
        fh = ["run", "study", "group", "seed", "error"]
        body = "".join(
            f"<tr><td><code>{e(f['run_id'])}</code></td><td>{e(f['study'])}</td><td>{e(f['label'])}</td>"
            f"<td>{e(str(f['seed'] if f['seed'] is not None else ''))}</td>"
            f'<td class="err">{e(_error_text(f["error"]))}</td></tr>' for f in failed)
        out += ['<div class="scroll"><table><thead><tr>' + "".join(f"<th>{h}</th>" for h in fh)
                + f"</tr></thead><tbody>{body}</tbody></table></div>"]
    out += ["</body></html>", ""]
    return "\n".join(out)


def write_report(out_dir: str | Path) -> tuple[Path, Path]:
    """(Re)write ``DIR/report.html``, ``DIR/report.md`` and ``DIR/plots/*.png`` from ``DIR/results.sqlite``.

    Args:
        out_dir: A study's output directory.

    Returns:
        The paths of ``report.html`` and ``report.md``.

    Raises:
        FileNotFoundError: ``out_dir`` holds no results database.
        ValueError: The database is not readable.
    """
    out_dir = Path(out_dir)
    with ResultStore(out_dir, create=False) as store:
        runs = store.runs()
        epochs = {r["run_id"]: store.epochs(r["run_id"]) for r in runs if r["status"] == "done"}
    studies = sorted({r["study"] for r in runs})
    groups = aggregate(runs)
    tables = study_tables(groups)
    comparison: list = []
    verdict: list[str] = []
    if is_compare(runs):  # one section per task; its figures replace the per-group ones
        arms = compare_results(runs, epochs)
        comparison = [(task, *compare_table(a), task_notes(a)) for task, a in arms.items()]
        verdict = [line for _, line in verdicts(arms)]
        plots = compare_plots(arms, epochs, _slug(studies[0] if len(studies) == 1 else "compare"))
    else:
        plots = make_plots(groups, epochs)
    # Runs that recorded GP-kernel distances (wide & sparse ``kernel`` option) add D and test error vs width.
    from widthlab.report.kernel_plots import kernel_plots
    plots += kernel_plots(runs)
    failed = failed_runs(runs)
    counts = status_counts(runs)

    if plots:
        (out_dir / PLOTS_DIR).mkdir(exist_ok=True)
        for p in plots:
            _atomic_write(out_dir / PLOTS_DIR / f"{p.name}.png", p.png)
    md_path, html_path = out_dir / MD_NAME, out_dir / HTML_NAME
    # Plots before the Markdown that points at them, so report.md never shows a missing image.
    parts = (studies, counts, tables, plots, failed, comparison, verdict)
    _atomic_write(md_path, render_markdown(*parts).encode())
    _atomic_write(html_path, render_html(*parts).encode())
    return html_path, md_path
