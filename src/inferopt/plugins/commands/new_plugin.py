"""``inferopt new-plugin``: write a new, installable plugin package from the built-in template.

The templates (``plugin_template/``, shipped inside inferopt) are complete plugins, one per
``--kind``: an optimizer (with a metric that counts its effect; the default), a backend, a
metric, a model source or a CLI command, each with a pyproject naming the ``inferopt`` entry
point and tests on the fixtures of :mod:`inferopt.testing` that pass as generated. The
example in ``docs/examples/inferopt-example-plugin`` is the optimizer template's output, kept in
sync by a test.
"""

from __future__ import annotations

import keyword
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any

import click

from inferopt import InferoptError, UsageError, hookimpl
from inferopt.utils import cli_fail

NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")

#: kind -> (class-name suffix, what NAME names, pyproject description)
KINDS = {
    "optimizer": ("Optimizer", "optimizer", "the $name optimizer and the $metric metric"),
    "backend": ("Backend", "backend", "the $name backend"),
    "metric": ("Metric", "metric", "the $name metric"),
    "source": ("Models", "model source scheme", "the $name: model source"),
    "command": ("", "command", "the `inferopt $name` command"),
}


def _identifier(name: str) -> str:
    return name.replace("-", "_")


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def _builtin_names() -> set[str]:
    """Entry-point names and registered names of inferopt's own plugins."""
    import importlib.metadata as md

    names = {ep.name for ep in md.entry_points(group="inferopt")
             if getattr(ep.dist, "name", "") == "inferopt"}
    return names | {"latency", "throughput", "accuracy", "fidelity", "size", "cpu"}


def plan(name: str, dist: str | None = None, metric: str | None = None,
         kind: str = "optimizer") -> dict[str, str]:
    """The template variables for a plugin of ``kind`` whose optimizer, backend, metric, source
    scheme or command is called ``name``."""
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    if metric is not None and kind != "optimizer":
        raise UsageError(f"--metric names the metric of an optimizer plugin; a {kind} plugin "
                         "has none (for a metric plugin, use --kind metric and name it NAME)")
    for label, value in (("plugin name", name), ("--dist", dist), ("--metric", metric)):
        if value is not None and not NAME.match(value):
            raise UsageError(
                f"{label} {value!r}: use lowercase letters, digits and single dashes, starting "
                "with a letter (for example 'my-technique')")
    builtin = _builtin_names()
    if name in builtin:
        raise UsageError(f"plugin name {name!r} is taken by a built-in inferopt plugin; "
                         f"choose another (built-ins: {', '.join(sorted(builtin))})")
    if kind == "command" and name in ("run", "plugins"):
        raise UsageError(f"command {name!r} is one of inferopt's own; choose another")
    dist = dist or f"inferopt-{name}"
    if keyword.iskeyword(_identifier(dist)) or dist == "inferopt":
        raise UsageError(f"--dist {dist!r} cannot be a Python package name; choose another")
    suffix, _names, description = KINDS[kind]
    variables = {"name": name, "dist": dist, "module": _identifier(dist), "kind": kind}
    if kind == "optimizer":
        metric = metric or f"{name}-flops"
        variables.update(metric=metric, optimizer_class=_camel(name) + "Optimizer",
                         metric_class=_camel(metric) + "Metric")
    else:
        variables.update(class_name=_camel(name) + suffix, function=_identifier(name))
    variables["description"] = "An inferopt plugin: " + string.Template(
        description).substitute(variables) + "."
    return variables


def render(variables: dict[str, str]) -> dict[str, str]:
    """Relative path -> file content for the package described by ``variables``: the shared
    files of ``plugin_template/`` and those of its ``KIND/`` folder."""
    root = resources.files("inferopt.plugins.commands") / "plugin_template"
    files: dict[str, str] = {}

    def walk(node: object, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):  # type: ignore[attr-defined]
            if child.is_dir() and child.name != "__pycache__":
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".tmpl"):
                rel = f"{prefix}{child.name[: -len('.tmpl')]}"
                rel = rel.replace("module/", f"{variables['module']}/", 1)
                rel = rel.replace("tests/test_plugin.py", f"tests/test_{variables['module']}.py")
                text = string.Template(child.read_text(encoding="utf-8")).substitute(variables)
                files[rel] = text

    for child in root.iterdir():
        if child.is_dir() and child.name == variables["kind"]:
            walk(child, "")
        elif child.name.endswith(".tmpl"):
            rel = child.name[: -len(".tmpl")]
            files[rel] = string.Template(child.read_text(encoding="utf-8")).substitute(variables)
    return dict(sorted(files.items()))


def write(name: str, directory: str | Path | None = None, dist: str | None = None,
          metric: str | None = None, kind: str = "optimizer") -> Path:
    """Write the package; refuses to touch a directory that exists and is not empty."""
    variables = plan(name, dist, metric, kind)
    target = Path(directory) if directory is not None else Path(variables["dist"])
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{str(target)!r} exists and is not empty; choose another --dir")
    for rel, text in render(variables).items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("new-plugin", context_settings=CONTEXT)
@click.argument("name")
@click.option("--dir", "directory", metavar="DIR",
              help="Where to write the package. Default: ./DIST (./inferopt-NAME).")
@click.option("--dist", metavar="DIST", help="Distribution name. Default: inferopt-NAME.")
@click.option("--kind", type=click.Choice(list(KINDS)), default="optimizer", show_default=True,
              help="What the plugin adds: an optimizer (with a metric), a backend, a metric, a "
                   "model source (NAME is its scheme) or a command (`inferopt NAME`).")
@click.option("--metric", metavar="METRIC",
              help="--kind optimizer: name of the example metric. Default: NAME-flops.")
def new_plugin(name: str, directory: str | None, dist: str | None, kind: str,
               metric: str | None) -> None:
    """Write a new plugin package whose optimizer (or backend, metric, source, command) is
    called NAME.

    The package installs with pip, registers through the `inferopt` entry-point group, and its
    tests (on the fixtures of inferopt.testing) pass as generated; replace the example with
    yours.
    """
    try:
        target = write(name, directory, dist=dist, metric=metric, kind=kind)
    except InferoptError as exc:
        cli_fail(exc, False)
    click.echo(f"wrote {target}/")
    click.echo(f"next: cd {target} && pip install -e '.[test]' && inferopt plugins && "
               "python -m pytest")


@hookimpl
def inferopt_register_commands(cli: Any) -> None:
    cli.add_command(new_plugin)
