"""``inferopt compare``: several runs side by side, from their ``report.json`` files: the
columns are the quantities the reports' metrics describe, so no plugin needs to be installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from inferopt import InferoptError, UsageError, hookimpl
from inferopt.utils import REPORT_SCHEMA as SCHEMA
from inferopt.utils import cli_fail, markdown_table, print_table, report_rows


def _installed_metrics() -> dict[str, dict[str, Any]]:
    """The installed metrics' self-descriptions, to plot reports written before metrics
    declared their aspects (a broken plugin is left out)."""
    import inferopt

    session = inferopt.Session()
    out = {}
    for name in session.names("metric"):
        try:
            out[name] = session.describe("metric", name)["description"]
        except Exception:  # a broken plugin costs its own columns, not the plot
            continue
    return out


def load_report(path: str | Path) -> dict[str, Any]:
    """A report from a run directory or a ``report.json`` file, checked to be one."""
    p = Path(path)
    file = p / "report.json" if p.is_dir() else p
    if not file.is_file():
        raise UsageError(f"{path}: no report here; give a run directory (with report.json) or "
                         "a report.json file")
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file}: not a readable JSON report ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise UsageError(f"{file}: not an inferopt report (schema {found!r}; expected "
                         f"{SCHEMA!r})")
    _check_shape(doc, file)
    return doc


def _check_shape(doc: dict[str, Any], file: Path) -> None:
    """The parts of a report compare reads, checked, so that an edited or damaged report is
    one error naming the file and the field, not a traceback."""
    for side in ("baseline", "optimized"):
        part = doc.get(side)
        if not isinstance(part, dict) or not isinstance(part.get("metrics"), dict):
            raise UsageError(f"{file}: field {side!r} must be an object with 'metrics' (found "
                             f"{type(part).__name__}); was the report edited or cut short?")
        for name, values in part["metrics"].items():
            if not isinstance(values, dict):
                raise UsageError(f"{file}: field {side}.metrics.{name} must be an object, not "
                                 f"{type(values).__name__}")
    steps = doc.get("steps", [])
    if not isinstance(steps, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str)
            and isinstance(s.get("options", {}), dict) for s in steps):
        raise UsageError(f"{file}: field 'steps' must be a list of objects with a 'name'")
    for key in ("comparisons", "metrics", "verdict"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise UsageError(f"{file}: field {key!r} must be an object, not "
                             f"{type(doc[key]).__name__}")


FIXED = ("run", "steps", "backend")


def _steps(doc: dict[str, Any]) -> str:
    return " + ".join(
        s["name"] + (":" + ",".join(f"{k}={v}" for k, v in s["options"].items() if v not in
                                    (None, [], ""))[:60] if s.get("options") else "")
        for s in doc["steps"]) or "none"


def _backend(doc: dict[str, Any]) -> str:
    """Where the optimized model ran, and the baseline when it ran elsewhere."""
    recipe = doc.get("recipe") if isinstance(doc.get("recipe"), dict) else {}
    base = recipe.get("baseline_backend")
    return str(recipe.get("backend") or "-") + (f" (baseline on {base})" if base else "")


def table(docs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and one row per run: run, steps, then one column per quantity of the
    metrics present, as the reports describe them (no fixed columns: a third-party metric gets
    its own), and a verdict column per metric measured in pairs (latency's A/B verdict)."""
    columns = list(FIXED)
    rows = []
    for doc, quantities in zip(docs, report_rows(docs), strict=True):
        row = {"run": doc["run_id"], "steps": _steps(doc), "backend": _backend(doc)}
        for q in quantities:
            col = q["name"]
            better = f", {q['better']}" if q["better"] else ""
            better += ", few runs" if q["label"] != q["name"] else ""
            change = f" ({q['change']}{better})" if q["change"] != "-" else ""
            row[col] = f"{q['baseline']} -> {q['optimized']}{change}"
            if col not in columns:
                columns.append(col)
        for metric, comparison in (doc.get("paired") or {}).items():
            if comparison.get("verdict"):
                col = f"{metric} verdict"
                row[col] = str(comparison["verdict"])
                low, high = comparison.get("ci_low"), comparison.get("ci_high")
                if isinstance(low, int | float) and isinstance(high, int | float):
                    row[f"{metric} CI"] = f"x{low:.2f}-x{high:.2f}"
                for c in (col, f"{metric} CI"):
                    if c in row and c not in columns:
                        columns.append(c)
        rows.append(row)
    return columns, [{c: r.get(c, "-") for c in columns} for r in rows]


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("compare", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png",
              help="Also draw quality vs speed and size for all runs (needs matplotlib).")
def compare_command(runs: tuple[str, ...], markdown: bool, as_json: bool,
                    plot_path: str | None) -> None:
    """Tabulate several runs: RUN is a run directory or a report.json file."""
    try:
        docs = [load_report(r) for r in runs]
        if plot_path:
            from inferopt.utils import plot_available, plot_reports

            if not plot_available():
                raise UsageError("--plot needs matplotlib: pip install 'inferopt[plot]'")
            target = Path(plot_path)
            if target.suffix.lower() != ".png":
                raise UsageError(f"--plot {plot_path}: give a file name ending in .png")
            if target.exists():
                raise UsageError(f"--plot {plot_path}: the file exists; give a new name")
            if not target.parent.is_dir():
                raise UsageError(f"--plot {plot_path}: the directory {str(target.parent)!r} "
                                 "does not exist")
            plot_reports(docs, Path(plot_path), "inferopt compare", _installed_metrics())
    except InferoptError as exc:
        cli_fail(exc, False)
    columns, rows = table(docs)
    cells = [[r[c] for c in columns] for r in rows]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif markdown:
        click.echo(markdown_table(columns, cells), nl=False)
    else:
        print_table(f"inferopt compare: {len(rows)} run(s)", columns, cells)
    if plot_path:
        click.echo(f"plot: {plot_path}", err=True)


@hookimpl
def inferopt_register_commands(cli: Any) -> None:
    cli.add_command(compare_command)
