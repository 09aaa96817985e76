"""The ``inferopt`` command: thin over the Python API.

Exit codes: 0 ok, 1 a gate the user set failed, 2 bad usage or input, 130 interrupted.
Importing this module, ``inferopt --help`` and ``inferopt plugins`` do not import torch.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import click

from inferopt._errors import GateFailed, InferoptError, UsageError

from . import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _plugin_listing(strict: bool | None = None) -> dict[str, Any]:
    from inferopt._manager import PluginManager
    from inferopt._options import describe
    from inferopt._registry import load_plugins

    manager, registry = load_plugins(PluginManager(strict=strict).load_entrypoints())
    provides: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for entry in registry.entries():
        item: dict[str, Any] = {"name": entry.name, "summary": entry.summary}
        # one option model for every kind: a source lists the options of its spec
        option_class = entry.option_class
        item["options"] = describe(option_class) if option_class is not None else []
        if entry.kind == "metric":
            described = entry.obj.describe()
            item["quantities"] = described["quantities"]
            item["gates"] = described["gates"]
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


class PluginCommands(click.Group):
    """The ``inferopt`` group: ``run`` and ``plugins`` are its own; every other command comes
    from a plugin's ``inferopt_register_commands`` hook, loaded when a command is looked up (so
    plugins' modules are imported, torch is not). A plugin whose hook raises, or that registers
    a name already taken, loses its commands, not the CLI."""

    _loaded = False
    _core: frozenset[str] = frozenset()

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # each invocation sees the plugins installed now (tests run the CLI several times in
        # one process with different plugins on the path)
        if not self._core:
            self._core = frozenset(self.commands)
        for name in set(self.commands) - self._core:
            del self.commands[name]
        self._loaded = False
        with _sigterm_as_interrupt():
            return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # a command that does not handle Ctrl-C itself: click would print "Aborted!" and
            # exit 1, which means "a gate failed" here
            click.echo("interrupted", err=True)
            ctx.exit(130)

    def _load_plugin_commands(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from inferopt._manager import PluginManager

        manager = PluginManager().load_entrypoints()

        def register_for(plugin: str) -> dict[str, Any]:
            return {"cli": _GroupView(self, plugin)}

        manager.call_each("inferopt_register_commands", register_for,
                          on_error=manager.record_hook_failure)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._load_plugin_commands()
        return super().get_command(ctx, cmd_name)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    """SIGTERM (what ``timeout``, ``docker stop`` and CI cancellation send) stops a command the
    way Ctrl-C does: cleanly, with a message and exit 130, the earlier --out kept."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _GroupView:
    """What ``inferopt_register_commands(cli)`` gets: the group's ``command`` and ``group``
    decorators and ``add_command``, refusing a name that is already taken."""

    def __init__(self, group: click.Group, plugin: str) -> None:
        self._group = group
        self._plugin = plugin

    def add_command(self, command: click.Command, name: str | None = None) -> None:
        name = name or command.name
        if name in self._group.commands:
            raise ValueError(f"command {name!r} is already taken; plugin {self._plugin!r} "
                             "must pick another name")
        self._group.add_command(command, name)

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Any], click.Command]:
        def decorator(function: Any) -> click.Command:
            command = click.command(*args, **kwargs)(function)
            self.add_command(command)
            return command

        return decorator

    def group(self, *args: Any, **kwargs: Any) -> Callable[[Any], click.Group]:
        def decorator(function: Any) -> click.Group:
            group = click.group(*args, **kwargs)(function)
            self.add_command(group)
            return group

        return decorator


@click.group(cls=PluginCommands, context_settings=CONTEXT)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and the installed plugins.")
def main() -> None:
    """Make trained PyTorch models cheaper to run, and measure honestly by how much.

    `inferopt run` with no arguments trains a small classifier on the 8x8 digits dataset,
    quantizes it to int8 and prints baseline vs optimized latency, accuracy and size.
    """


def logging_options(default_level: str) -> Callable[[Any], Any]:
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


def input_options(command: Any) -> Any:
    """The options that say what to load and how to measure it, as ``run`` takes them: the
    RECIPE argument, --model, --data, --split, --output, --trust-model, --backend, --batch-size
    and --seed (for commands that run the pipeline on a model, as ``tune`` does)."""
    options = [
        click.argument("recipe", required=False, type=click.Path(dir_okay=False)),
        click.option("--model", "-m", metavar="SPEC",
                     help="Model spec: demo:digits-mlp, python:MODULE:CALLABLE[:k=v,...], "
                          "PATH.py:CALLABLE, PATH.pt2, PATH.pt/.ts (TorchScript), hf:DIR."),
        click.option("--data", "-d", metavar="SPEC",
                     help="Data spec: demo:digits, synthetic:shape=64x1024, PATH.pt/.npy/.npz/"
                          ".safetensors/.csv, text:FILE, python:MODULE:CALLABLE, "
                          "PATH.py:CALLABLE."),
        click.option("--split", metavar="calibration=N,train=N,eval=N,seed=S",
                     help="Re-split the data's samples: sizes of each split, drawn without "
                          "overlap after a seeded shuffle. Default: the data source's own "
                          "splits."),
        click.option("--output", "output", metavar="NAME",
                     help="Which model output metrics and steps compare: a key or attribute "
                          "(last_hidden_state), a tuple position (0), dots to go deeper. "
                          "Default: logits if the model returns them, else the first tensor."),
        click.option("--trust-model", is_flag=True,
                     help="Allow loading a model file that needs unpickling (a pickled "
                          "nn.Module). Unpickling runs code from the file: only for files you "
                          "trust."),
        click.option("--backend", "-b", metavar="NAME[:k=v,...]",
                     help="Where to run. Default: cpu."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Batch size. Default: 64."),
        click.option("--seed", type=int, help="Random seed. Default: 0."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@contextlib.contextmanager
def errors(debug: bool, interrupted: str) -> Iterator[None]:
    """A command's body: an :class:`InferoptError` is printed and exits with its code (as
    :func:`fail`), Ctrl-C prints ``interrupted: <interrupted>`` and exits 130, and any other
    exception is one ``error:`` line and exit 2 (the traceback with ``debug``)."""
    try:
        yield
    except InferoptError as exc:
        fail(exc, debug)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {interrupted}", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(2)


@main.command(context_settings=CONTEXT)
@input_options
@click.option("--keep-going", is_flag=True,
              help="If a step fails (raises, or breaks the model's outputs or the accuracy "
                   "budget), record it, undo it and run the remaining steps; exit 1 at the end.")
@click.option("--allow-collapse", is_flag=True,
              help="Let a step whose outputs no longer match the baseline's (cosine < 0.9 on "
                   "the first batch) go on with a warning instead of stopping the run.")
@click.option("--baseline-backend", metavar="NAME[:k=v,...]",
              help="Measure the baseline on this backend instead of --backend (the same "
                   "device): the optimized model on --backend against the model as it runs "
                   "today, e.g. --backend openvino --baseline-backend cpu.")
@click.option("--optimize", "-O", "optimize", multiple=True, metavar="NAME[:k=v,...]",
              help="An optimizer step; repeat for several, applied in order. 'none' for no "
                   "steps. Default: int8.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME[:k=v,...]",
              help="A metric; repeat for several. Default: latency, throughput, accuracy, "
                   "fidelity, size.")
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
@click.option("--gate", "gate_flags", multiple=True, metavar="NAME=VALUE",
              help="Gate: exit 1 if the threshold is not met; any gate an installed metric "
                   "offers (inferopt plugins lists them). Repeat for several.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only the report JSON on stdout (logs go to stderr).")
@logging_options(default_level="info")
def run(
    recipe: str | None,
    model: str | None,
    data: str | None,
    split: str | None,
    output: str | None,
    trust_model: bool,
    keep_going: bool,
    allow_collapse: bool,
    optimize: tuple[str, ...],
    backend: str | None,
    baseline_backend: str | None,
    metrics: tuple[str, ...],
    batch_size: int | None,
    seed: int | None,
    out: str | None,
    overwrite: bool,
    max_accuracy_drop: str | None,
    min_speedup: float | None,
    max_size_ratio: float | None,
    gate_flags: tuple[str, ...],
    as_json: bool,
    log_format: str,
    log_level: str,
    strict_plugins: bool,
    debug: bool,
) -> None:
    """Optimize a model and report baseline vs optimized.

    RECIPE is an optional TOML file; flags override its fields.
    """
    from inferopt._logging import configure

    configure(log_format, log_level)
    from inferopt._progress import set_disabled

    set_disabled(as_json)  # with --json, stdout is the document and stderr only the logs
    with errors(debug, "stopped cleanly; no partial output was kept"):
        from inferopt._manager import PluginManager
        from inferopt._pipeline import run as run_pipeline
        from inferopt._recipe import make_recipe

        rec = make_recipe(
            recipe,
            model=model,
            data=data,
            backend=backend,
            baseline_backend=baseline_backend,
            optimize=list(optimize) or None,
            metrics=list(metrics) or None,
            batch_size=batch_size,
            seed=seed,
            out=out,
            output=output,
            split=split,
            trust_model=trust_model,
            keep_going=keep_going,
            allow_collapse=allow_collapse,
            gates={
                **accuracy_gate(max_accuracy_drop),
                "min_speedup": min_speedup,
                "max_size_ratio": max_size_ratio,
                **parse_gates(gate_flags),
            },
        )
        manager = PluginManager(strict=True if strict_plugins else None).load_entrypoints()
        report = run_pipeline(rec, manager=manager, overwrite=overwrite)
    if not report.main_worker:
        return  # another torchrun worker: the main one prints the report
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console

        report.render_console(Console())
    failed = [g["name"] for g in report.gates if not g["passed"]]
    if failed:
        fail(GateFailed(f"gate failed: {', '.join(failed)} (results were saved)"), False)
    if report.failed_steps:
        steps = ", ".join(f"{s.index} {s.name!r}" for s in report.failed_steps)
        fail(GateFailed(f"step(s) {steps} failed and were undone (--keep-going); the other "
                         "steps ran and the results were saved"), False)


def fail(exc: InferoptError, debug: bool) -> None:
    import os

    if debug:
        traceback.print_exc()
    elif os.environ.get("RANK", "0") != "0" and type(exc).__name__ != "WorkerLost":
        # under torchrun every worker meets the same bad input: the main one says it once.
        # A lost worker is reported by whoever noticed it (the main one may be the lost one)
        sys.exit(exc.exit_code)
    from inferopt._errors import Interrupted

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
        fail(exc, False)
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
    gates = [(i["name"], name, g) for p in listing["plugins"]
             for i in p["provides"].get("metric", []) for name, g in i.get("gates", {}).items()]
    if gates:
        console.print("gates (--gate NAME=VALUE):")
        for metric, name, g in gates:
            console.print(f"  {name} ({metric}, {g['kind']} of {g['quantity']}): {g['help']}",
                          highlight=False, soft_wrap=True)
    for f in listing["failed"]:
        console.print(f"[red]failed:[/] {f['name']} ({f['distribution']} {f['version']}): "
                      f"{f['error']}", markup=True, highlight=False, soft_wrap=True)
    if listing["skipped"]:
        console.print(f"skipped by INFEROPT_PLUGINS / INFEROPT_BLOCK_PLUGINS: "
                      f"{', '.join(listing['skipped'])}")


def parse_gates(flags: tuple[str, ...]) -> dict[str, float]:
    """``--gate NAME=VALUE`` flags as a dict; names are checked against the installed
    metrics' gates when the run's plugins are resolved."""
    gates = {}
    for flag in flags:
        name, eq, value = flag.partition("=")
        try:
            if not eq or not name.strip():
                raise ValueError
            gates[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--gate {flag!r}: write NAME=NUMBER, for example "
                             "--gate min_speedup=1.2") from None
    return gates


def accuracy_gate(value: str | None) -> dict[str, float | None]:
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
