"""``inferopt new-plugin``: write a new, installable plugin package from the built-in template.

The template (``plugin_template/``, shipped inside inferopt) is a complete plugin: an optimizer,
a metric, a pyproject with the ``inferopt`` entry point, and tests that pass as generated. The
example in ``docs/examples/inferopt-example-plugin`` is this template's output, kept in sync by a
test.
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


def plan(name: str, dist: str | None = None, metric: str | None = None) -> dict[str, str]:
    """The template variables for a plugin whose optimizer is called ``name``."""
    for label, value in (("plugin name", name), ("--dist", dist), ("--metric", metric)):
        if value is not None and not NAME.match(value):
            raise UsageError(
                f"{label} {value!r}: use lowercase letters, digits and single dashes, starting "
                "with a letter (for example 'my-technique')")
    builtin = _builtin_names()
    if name in builtin:
        raise UsageError(f"plugin name {name!r} is taken by a built-in inferopt plugin; "
                         f"choose another (built-ins: {', '.join(sorted(builtin))})")
    dist = dist or f"inferopt-{name}"
    if keyword.iskeyword(_identifier(dist)) or dist == "inferopt":
        raise UsageError(f"--dist {dist!r} cannot be a Python package name; choose another")
    metric = metric or f"{name}-flops"
    return {
        "name": name,
        "dist": dist,
        "module": _identifier(dist),
        "metric": metric,
        "optimizer_class": _camel(name) + "Optimizer",
        "metric_class": _camel(metric) + "Metric",
    }


def render(variables: dict[str, str]) -> dict[str, str]:
    """Relative path -> file content for the package described by ``variables``."""
    root = resources.files("inferopt.plugins.commands") / "plugin_template"
    files: dict[str, str] = {}

    def walk(node: object, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):  # type: ignore[attr-defined]
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".tmpl"):
                rel = f"{prefix}{child.name[: -len('.tmpl')]}"
                rel = rel.replace("module/", f"{variables['module']}/", 1)
                rel = rel.replace("tests/test_plugin.py", f"tests/test_{variables['module']}.py")
                text = string.Template(child.read_text(encoding="utf-8")).substitute(variables)
                files[rel] = text

    walk(root, "")
    return files


def write(name: str, directory: str | Path | None = None, dist: str | None = None,
          metric: str | None = None) -> Path:
    """Write the package; refuses to touch a directory that exists and is not empty."""
    variables = plan(name, dist, metric)
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
@click.option("--metric", metavar="METRIC", help="Name of the example metric. Default: NAME-flops.")
def new_plugin(name: str, directory: str | None, dist: str | None, metric: str | None) -> None:
    """Write a new plugin package whose optimizer is called NAME.

    The package installs with pip, registers through the `inferopt` entry-point group, and its
    tests pass as generated; replace the example technique with yours.
    """
    try:
        target = write(name, directory, dist=dist, metric=metric)
    except InferoptError as exc:
        cli_fail(exc, False)
    click.echo(f"wrote {target}/")
    click.echo(f"next: cd {target} && pip install -e '.[test]' && inferopt plugins && "
               "python -m pytest")


@hookimpl
def inferopt_register_commands(cli: Any) -> None:
    cli.add_command(new_plugin)
