"""The ``inferopt`` command: thin over the Python API.

Exit codes: 0 ok, 1 a gate the user set failed, 2 bad usage or input, 130 interrupted.
Importing this module, ``inferopt --help`` and ``inferopt plugins`` do not import torch.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import GateFailed, InferoptError, UsageError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _plugin_listing(strict: bool | None = None) -> dict[str, Any]:
    from .manager import PluginManager
    from .options import describe
    from .registry import load_plugins

    manager, registry = load_plugins(PluginManager(strict=strict).load_entrypoints())
    provides: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for entry in registry.entries():
        item: dict[str, Any] = {"name": entry.name, "summary": entry.summary}
        if entry.kind in ("optimizer", "backend", "metric"):
            item["options"] = describe(entry.obj)
        provides.setdefault(entry.plugin, {}).setdefault(entry.kind, []).append(item)
    return {
        "inferopt": __version__,
        "plugins": [
            {
                "name": p.name,
                "module": p.module,
                "distribution": p.distribution,
                "version": p.version,
                "hooks": list(p.hooks),
                "provides": provides.get(p.name, {}),
            }
            for p in manager.plugins.values()
        ],
        "failed": [
            {"name": f.name, "distribution": f.distribution, "version": f.version,
             "error": f.error}
            for f in manager.failures
        ],
        "skipped": manager.skipped,
    }


def _print_version(ctx: click.Context, _param: Any, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"inferopt {__version__}")
    listing = _plugin_listing()
    for p in listing["plugins"]:
        click.echo(f"  {p['name']} {p['version']} ({p['distribution']})")
    for f in listing["failed"]:
        click.echo(f"  {f['name']} FAILED: {f['error']}")
    ctx.exit(0)


@click.group(context_settings=CONTEXT)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and the installed plugins.")
def main() -> None:
    """Make trained PyTorch models cheaper to run, and measure honestly by how much.

    `inferopt run` with no arguments trains a small classifier on the 8x8 digits dataset,
    quantizes it to int8 and prints baseline vs optimized latency, accuracy and size.
    """


def _logging_options(default_level: str) -> Callable[[Any], Any]:
    """The options every command that runs the pipeline shares: log format and level, strict
    plugins, tracebacks."""
    options = [
        click.option("--log-format", type=click.Choice(["console", "json"]), default="console",
                     show_default=True),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                     default=default_level, show_default=True),
        click.option("--strict-plugins", is_flag=True, help="Fail if any plugin fails to load."),
        click.option("--debug", is_flag=True, help="Show tracebacks for errors."),
    ]

    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@main.command(context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "-m", metavar="SPEC",
              help="Model spec: demo:digits-mlp, python:MODULE:CALLABLE[:k=v,...], "
                   "PATH.py:CALLABLE, PATH.pt2, PATH.pt/.ts (TorchScript), hf:DIR.")
@click.option("--data", "-d", metavar="SPEC",
              help="Data spec: demo:digits, synthetic:shape=64x1024, PATH.pt/.npy/.npz/"
                   ".safetensors/.csv, text:FILE, python:MODULE:CALLABLE, PATH.py:CALLABLE.")
@click.option("--split", metavar="calibration=N,train=N,eval=N,seed=S",
              help="Re-split the data's samples: sizes of each split, drawn without overlap "
                   "after a seeded shuffle. Default: the data source's own splits.")
@click.option("--output", "output", metavar="NAME",
              help="Which model output metrics and steps compare: a key or attribute "
                   "(last_hidden_state), a tuple position (0), dots to go deeper. "
                   "Default: logits if the model returns them, else the first tensor.")
@click.option("--trust-model", is_flag=True,
              help="Allow loading a model file that needs unpickling (a pickled nn.Module). "
                   "Unpickling runs code from the file: only for files you trust.")
@click.option("--keep-going", is_flag=True,
              help="If a step fails (raises, or breaks the model's outputs or the accuracy "
                   "budget), record it, undo it and run the remaining steps; exit 1 at the end.")
@click.option("--optimize", "-O", "optimize", multiple=True, metavar="NAME[:k=v,...]",
              help="An optimizer step; repeat for several, applied in order. 'none' for no "
                   "steps. Default: int8.")
@click.option("--backend", "-b", metavar="NAME[:k=v,...]", help="Where to run. Default: cpu.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME[:k=v,...]",
              help="A metric; repeat for several. Default: latency, throughput, accuracy, "
                   "fidelity, size.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size. Default: 64.")
@click.option("--seed", type=int, help="Random seed. Default: 0.")
@click.option("--out", "-o", metavar="DIR",
              help="Where to save model and report. Default: inferopt-runs/RUN_ID.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--max-accuracy-drop", metavar="POINTS|PCT%",
              help="Gate: exit 1 if top-1 accuracy drops by more than this many points "
                   "(1.0), or by more than this share of the baseline's accuracy (2%).")
@click.option("--min-speedup", type=float, metavar="X",
              help="Gate: exit 1 if p50 latency speedup is below X.")
@click.option("--max-size-ratio", type=float, metavar="R",
              help="Gate: exit 1 if optimized size / baseline size is above R.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only the report JSON on stdout (logs go to stderr).")
@_logging_options(default_level="info")
def run(
    recipe: str | None,
    model: str | None,
    data: str | None,
    split: str | None,
    output: str | None,
    trust_model: bool,
    keep_going: bool,
    optimize: tuple[str, ...],
    backend: str | None,
    metrics: tuple[str, ...],
    batch_size: int | None,
    seed: int | None,
    out: str | None,
    overwrite: bool,
    max_accuracy_drop: str | None,
    min_speedup: float | None,
    max_size_ratio: float | None,
    as_json: bool,
    log_format: str,
    log_level: str,
    strict_plugins: bool,
    debug: bool,
) -> None:
    """Optimize a model and report baseline vs optimized.

    RECIPE is an optional TOML file; flags override its fields.
    """
    from .logging import configure

    configure(log_format, log_level)
    from .progress import set_disabled

    set_disabled(as_json)  # with --json, stdout is the document and stderr only the logs
    try:
        from .manager import PluginManager
        from .pipeline import run as run_pipeline
        from .recipe import make_recipe

        rec = make_recipe(
            recipe,
            model=model,
            data=data,
            backend=backend,
            optimize=list(optimize) or None,
            metrics=list(metrics) or None,
            batch_size=batch_size,
            seed=seed,
            out=out,
            output=output,
            split=split,
            trust_model=trust_model,
            keep_going=keep_going,
            gates={
                **_accuracy_gate(max_accuracy_drop),
                "min_speedup": min_speedup,
                "max_size_ratio": max_size_ratio,
            },
        )
        manager = PluginManager(strict=True if strict_plugins else None).load_entrypoints()
        report = run_pipeline(rec, manager=manager, overwrite=overwrite)
    except InferoptError as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        click.echo("interrupted: stopped cleanly; no partial output was kept", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(2)
    if not report.main_worker:
        return  # another torchrun worker: the main one prints the report
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console

        report.render_console(Console())
    failed = [g["name"] for g in report.gates if not g["passed"]]
    if failed:
        _fail(GateFailed(f"gate failed: {', '.join(failed)} (results were saved)"), False)
    if report.failed_steps:
        steps = ", ".join(f"{s.index} {s.name!r}" for s in report.failed_steps)
        _fail(GateFailed(f"step(s) {steps} failed and were undone (--keep-going); the other "
                         "steps ran and the results were saved"), False)


@main.command(context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "-m", metavar="SPEC", help="Model spec, as for `inferopt run`.")
@click.option("--data", "-d", metavar="SPEC", help="Data spec (labelled), as for `inferopt run`.")
@click.option("--split", metavar="calibration=N,train=N,eval=N,seed=S",
              help="Re-split the data's samples, as for `inferopt run`.")
@click.option("--output", "output", metavar="NAME", help="Which model output to compare.")
@click.option("--trust-model", is_flag=True, help="Allow unpickling the model file.")
@click.option("--backend", "-b", metavar="NAME[:k=v,...]", help="Where to run. Default: cpu.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME[:k=v,...]",
              help="A metric, or options for one (latency:precision=thorough); latency, "
                   "accuracy and size (and throughput) are always measured.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size. Default: 64.")
@click.option("--seed", type=int, help="Random seed. Default: 0.")
@click.option("--max-accuracy-drop", default="1.0", show_default=True, metavar="POINTS|PCT%",
              help="The accuracy budget: points of top-1 accuracy (1.0) or a share of the "
                   "baseline's accuracy (2%).")
@click.option("--objective", type=click.Choice(["latency", "size", "throughput"]),
              default="latency", show_default=True,
              help="What the chosen candidate is best at, among those within the budget.")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Stop starting trials when this much time is spent "
                                      "(the time of this invocation; logged trials are free).")
@click.option("--trials", "max_trials", type=click.IntRange(min=1), default=40,
              show_default=True, help="At most this many trials (logged ones included).")
@click.option("--technique", "-t", "techniques", multiple=True, metavar="NAME[:k=v,...]",
              help="Search only these optimizers (repeat); options given are fixed. Default: "
                   "every installed optimizer that declares searchable options.")
@click.option("--out", "-o", metavar="DIR", default="inferopt-tune", show_default=True,
              help="Where the trial log, the summary and the chosen model go. Rerunning with "
                   "the same DIR continues the search.")
@click.option("--restart", is_flag=True, help="Discard the trials logged in --out and start over.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only the tune document (inferopt.tune/1) on stdout.")
@_logging_options(default_level="warning")
def tune(
    recipe: str | None,
    model: str | None,
    data: str | None,
    split: str | None,
    output: str | None,
    trust_model: bool,
    backend: str | None,
    metrics: tuple[str, ...],
    batch_size: int | None,
    seed: int | None,
    max_accuracy_drop: str,
    objective: str,
    budget_minutes: float,
    max_trials: int,
    techniques: tuple[str, ...],
    out: str,
    restart: bool,
    as_json: bool,
    log_format: str,
    log_level: str,
    strict_plugins: bool,
    debug: bool,
) -> None:
    """Search the installed techniques for the best recipe within an accuracy budget.

    Every trial is measured against the same baseline (latency interleaved A/B) and logged in
    DIR/trials.jsonl; the best candidate that meets the goal is saved to DIR/best like a run.
    Exits 1 when no candidate meets the goal, listing the three closest.
    """
    from .logging import configure

    configure(log_format, log_level)
    from .progress import set_disabled

    set_disabled(as_json)
    try:
        from .manager import PluginManager
        from .recipe import make_recipe, parse_spec
        from .tune import Budget, TuneSettings, result_lines
        from .tune import tune as run_tune

        gate = _accuracy_gate(max_accuracy_drop)
        budget = Budget(next(iter(gate.values())) or 0.0,
                        relative="max_relative_accuracy_drop" in gate)
        rec = make_recipe(recipe, model=model, data=data, backend=backend,
                          metrics=list(metrics) or None, batch_size=batch_size, seed=seed,
                          output=output, split=split, trust_model=trust_model)
        settings = TuneSettings(
            recipe=rec, budget=budget, objective=objective,
            budget_seconds=budget_minutes * 60, max_trials=max_trials,
            techniques=tuple(parse_spec(t, "--technique") for t in techniques),
            out=Path(out), restart=restart)
        manager = PluginManager(strict=True if strict_plugins else None).load_entrypoints()

        def echo(line: str) -> None:
            click.echo(line, err=True)

        result = run_tune(settings, manager=manager, echo=echo)
    except InferoptError as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        click.echo(f"interrupted: the finished trials are in {out}/trials.jsonl; rerun the same "
                   "command to continue", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(2)
    doc = result.document
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        from .tune import COLUMNS, table_rows

        table = Table(title=f"inferopt tune: {len(doc['trials'])} trials")
        for col in COLUMNS:
            table.add_column(col, overflow="fold", no_wrap=col != "recipe")
        for row in table_rows(doc):
            table.add_row(*row)
        # a pipe or a log file gets the whole table, not one folded to 80 columns
        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(table)
        for line in result_lines(doc):
            console.print(line, soft_wrap=True, highlight=False, markup=False)
        console.print(f"trial log: {doc['artifacts']['log']}; summary: "
                      f"{doc['artifacts']['summary']}", soft_wrap=True, highlight=False)
    if doc.get("chosen") is None:
        lines = [line for line in result_lines(doc) if line.startswith(("no candidate",
                                                                         "closest"))]
        click.echo("error: " + "\n  ".join(lines), err=True)
        sys.exit(1)


def _fail(exc: InferoptError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    from .errors import Interrupted

    click.echo(f"{'' if isinstance(exc, Interrupted) else 'error: '}{exc}", err=True)
    sys.exit(exc.exit_code)


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@click.option("--strict-plugins", is_flag=True, help="Fail if any plugin fails to load.")
def plugins(as_json: bool, strict_plugins: bool) -> None:
    """List installed plugins, who provides them, and what they register."""
    try:
        listing = _plugin_listing(strict=True if strict_plugins else None)
    except InferoptError as exc:
        _fail(exc, False)
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"inferopt {listing['inferopt']} plugins")
    for col in ("plugin", "distribution", "provides", "hooks"):
        table.add_column(col)
    for p in listing["plugins"]:
        provides = "; ".join(
            f"{kind}: {', '.join(i['name'] for i in items)}"
            for kind, items in p["provides"].items()
        )
        hooks = ", ".join(h.removeprefix("inferopt_") for h in p["hooks"])
        table.add_row(p["name"], f"{p['distribution']} {p['version']}", provides, hooks)
    console = Console()
    console.print(table)
    for f in listing["failed"]:
        console.print(f"[red]failed:[/] {f['name']} ({f['distribution']} {f['version']}): "
                      f"{f['error']}", markup=True, highlight=False, soft_wrap=True)
    if listing["skipped"]:
        console.print(f"skipped by INFEROPT_PLUGINS / INFEROPT_BLOCK_PLUGINS: "
                      f"{', '.join(listing['skipped'])}")


@main.command(context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png",
              help="Also draw quality vs latency and size for all runs (needs matplotlib).")
def compare(runs: tuple[str, ...], markdown: bool, as_json: bool, plot_path: str | None) -> None:
    """Tabulate several runs: RUN is a run directory or a report.json file."""
    from . import compare as cmp

    try:
        docs = [cmp.load_report(r) for r in runs]
        if plot_path:
            from . import plotting

            if not plotting.available():
                raise UsageError("--plot needs matplotlib: pip install 'inferopt[plot]'")
            target = Path(plot_path)
            if target.suffix.lower() != ".png":
                raise UsageError(f"--plot {plot_path}: give a file name ending in .png")
            if target.exists():
                raise UsageError(f"--plot {plot_path}: the file exists; give a new name")
            if not target.parent.is_dir():
                raise UsageError(f"--plot {plot_path}: the directory {str(target.parent)!r} "
                                 "does not exist")
            plotting.plot_reports(docs, Path(plot_path), "inferopt compare")
    except InferoptError as exc:
        _fail(exc, False)
    rows = [cmp.row(d) for d in docs]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif markdown:
        click.echo(cmp.to_markdown(rows), nl=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"inferopt compare: {len(rows)} run(s)")
        for col in cmp.COLUMNS:
            table.add_column(col)
        for r in rows:
            table.add_row(*(r[c] for c in cmp.COLUMNS))
        Console().print(table)
    if plot_path:
        click.echo(f"plot: {plot_path}", err=True)


@main.command("new-plugin", context_settings=CONTEXT)
@click.argument("name")
@click.option("--dir", "directory", metavar="DIR",
              help="Where to write the package. Default: ./DIST (./inferopt-NAME).")
@click.option("--dist", metavar="DIST", help="Distribution name. Default: inferopt-NAME.")
@click.option("--metric", metavar="METRIC", help="Name of the example metric. Default: NAME-flops.")
def new_plugin(name: str, directory: str | None, dist: str | None, metric: str | None) -> None:
    """Write a new plugin package whose optimizer is called NAME.

    The package installs with pip, registers through the `inferopt` entry-point group, and its
    tests pass as generated; replace the example technique with yours.
    """
    from .scaffold import write

    try:
        target = write(name, directory, dist=dist, metric=metric)
    except InferoptError as exc:
        _fail(exc, False)
    click.echo(f"wrote {target}/")
    click.echo(f"next: cd {target} && pip install -e '.[test]' && inferopt plugins && "
               "python -m pytest")


def _accuracy_gate(value: str | None) -> dict[str, float | None]:
    """``--max-accuracy-drop``: ``1.0`` is points of top-1 accuracy, ``2%`` a share of the
    baseline's accuracy."""
    if value is None:
        return {}
    text = value.strip()
    relative = text.endswith("%")
    try:
        number = float(text.rstrip("%").strip())
    except ValueError:
        raise UsageError(f"--max-accuracy-drop {value!r}: give points of accuracy (1.0) or a "
                         "share of the baseline's accuracy (2%)") from None
    if number < 0:
        raise UsageError(f"--max-accuracy-drop {value!r}: give a number >= 0")
    key = "max_relative_accuracy_drop" if relative else "max_accuracy_drop"
    return {key: number}
