"""The ``inferopt tune`` command: its flags and its output (the search: :mod:`.tuner`)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from inferopt import InferoptError, hookimpl
from inferopt.utils import cli_fail, cli_logging_options

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT)
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
@click.option("--objective", default="latency", show_default=True,
              metavar="METRIC[.FIELD]",
              help="What the chosen candidate is best at, among those within the budget: any "
                   "installed metric (its primary quantity: latency, size, throughput, ...) or "
                   "any quantity a metric declares with a direction (METRIC.FIELD).")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Stop starting trials when this much time is spent "
                                      "(shared by the study's workers; a rerun after it "
                                      "passed gets a new one).")
@click.option("--trials", "max_trials", type=click.IntRange(min=1), default=40,
              show_default=True, help="At most this many trials in the study (every "
                                      "worker's and earlier runs' included).")
@click.option("--technique", "-t", "techniques", multiple=True, metavar="NAME[:k=v,...]",
              help="Search only these optimizers (repeat); options given are fixed. Default: "
                   "every installed optimizer that declares searchable options.")
@click.option("--out", "-o", metavar="DIR", default="inferopt-tune", show_default=True,
              help="Where the study (study.db, unless --storage), the summary and the chosen "
                   "model go. Rerunning with the same DIR continues the search.")
@click.option("--storage", metavar="URL",
              help="The study's database (sqlite:///path.db, postgresql+psycopg://user@host/db): "
                   "workers on several machines share one search. Default: DIR/study.db.")
@click.option("--study", "study_name", metavar="NAME", default="inferopt-tune",
              show_default=True, help="The study to create or join in the storage.")
@click.option("--heartbeat-seconds", type=click.FloatRange(min=0.5), default=10.0,
              show_default=True, help="How often a worker says it is alive; a trial whose "
                                      "worker stays silent 3 times as long is run again.")
@click.option("--restart", is_flag=True, help="Discard the study and files in --out and start "
                                              "over.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only the tune document (inferopt.tune/2) on stdout.")
@cli_logging_options(default_level="warning")
def tune(**flags: Any) -> None:
    """Search the installed techniques for the best recipe within an accuracy budget.

    Every trial is measured against the same baseline (latency interleaved A/B) and stored in
    an Optuna study; start more workers with the same --storage and --study to share the
    search. The best candidate that meets the goal is saved to DIR/best like a run. Exits 1
    when no candidate meets the goal, listing the three closest.
    """
    from inferopt.utils import configure_logging, disable_progress

    debug, as_json, out, storage = (flags[k] for k in ("debug", "as_json", "out", "storage"))
    configure_logging(flags["log_format"], flags["log_level"])
    disable_progress(as_json)
    try:
        from inferopt.plugins.commands.tune.tuner import tune_search

        doc = tune_search(flags, echo=lambda line: click.echo(line, err=True))
    except InferoptError as exc:
        cli_fail(exc, debug)
    except KeyboardInterrupt:
        where = storage.split("://")[0] + "://..." if storage else f"{out}/study.db"
        click.echo(f"interrupted: the finished trials are in the study ({where}); rerun the "
                   "same command to continue", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(2)
    from inferopt.plugins.commands.tune.results import result_lines, table_rows

    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        from inferopt.plugins.commands.tune.results import COLUMNS

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
        console.print(f"study: {doc['artifacts']['study']}; summary: "
                      f"{doc['artifacts']['summary']}", soft_wrap=True, highlight=False)
    if doc.get("chosen") is None:
        lines = [line for line in result_lines(doc) if line.startswith(("no candidate",
                                                                         "closest"))]
        click.echo("error: " + "\n  ".join(lines), err=True)
        sys.exit(1)


@hookimpl
def inferopt_register_commands(cli: Any) -> None:
    cli.add_command(tune)
