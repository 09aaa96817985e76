"""``inferopt compare``: several runs side by side, from their ``report.json`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from inferopt import InferoptError, UsageError, hookimpl
from inferopt.utils import REPORT_SCHEMA as SCHEMA
from inferopt.utils import cli_fail

COLUMNS = ("run", "steps", "p50 ms (base -> opt)", "speedup [CI]", "latency verdict",
           "top-1 (change)", "size ratio")


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
    return doc


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, int | float) else "-"


def row(doc: dict[str, Any]) -> dict[str, str]:
    """One run as the table's cells."""
    base, opt = doc["baseline"]["metrics"], doc["optimized"]["metrics"]
    verdict = doc.get("verdict", {})
    steps = " + ".join(
        s["name"] + (":" + ",".join(f"{k}={v}" for k, v in s["options"].items() if v not in
                                    (None, [], ""))[:60] if s.get("options") else "")
        for s in doc["steps"]) or "none"
    lb, lo = base.get("latency", {}).get("p50_ms"), opt.get("latency", {}).get("p50_ms")
    ci = verdict.get("speedup_ci")
    speed = _fmt(verdict.get("speedup"), ".2f") + "x"
    if ci:
        speed += f" [{ci[0]:.2f}-{ci[1]:.2f}]"
    ab, ao = base.get("accuracy", {}).get("top1"), opt.get("accuracy", {}).get("top1")
    acc = "-" if ao is None else f"{ao * 100:.2f}%" + (
        f" ({(ao - ab) * 100:+.2f})" if isinstance(ab, int | float) else "")
    return {
        "run": doc["run_id"],
        "steps": steps,
        "p50 ms (base -> opt)": f"{_fmt(lb, '.3f')} -> {_fmt(lo, '.3f')}",
        "speedup [CI]": speed if verdict.get("speedup") is not None else "-",
        "latency verdict": verdict.get("latency", "-"),
        "top-1 (change)": acc,
        "size ratio": _fmt(verdict.get("size_ratio"), ".3f"),
    }


def to_markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("compare", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png",
              help="Also draw quality vs latency and size for all runs (needs matplotlib).")
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
            plot_reports(docs, Path(plot_path), "inferopt compare")
    except InferoptError as exc:
        cli_fail(exc, False)
    rows = [row(d) for d in docs]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif markdown:
        click.echo(to_markdown(rows), nl=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"inferopt compare: {len(rows)} run(s)")
        for col in COLUMNS:
            table.add_column(col)
        for r in rows:
            table.add_row(*(r[c] for c in COLUMNS))
        Console().print(table)
    if plot_path:
        click.echo(f"plot: {plot_path}", err=True)


@hookimpl
def inferopt_register_commands(cli: Any) -> None:
    cli.add_command(compare_command)
