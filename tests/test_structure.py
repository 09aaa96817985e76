"""The package's shape holds: one public surface, no import cycles, commands as plugins.

* Built-in plugins import only what a third-party plugin can: ``inferopt``, ``inferopt.utils``,
  ``inferopt.testing`` and modules of their own group (``inferopt.plugins.quantization...`` for
  int8); never a private ``inferopt._*`` module, never another kind's plugin.
* Code in the docs (Python blocks in the Markdown and the example files) imports no private
  module either.
* No import cycles inside the package, counting imports inside functions and under
  ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PLUGINS = SRC / "inferopt" / "plugins"
PUBLIC = {"inferopt", "inferopt.utils", "inferopt.testing"}



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, here: str, is_package: bool) -> list[str]:
    """Every module an AST imports (function-level and TYPE_CHECKING imports included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".") if is_package else here.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def _group_of(module: str) -> str:
    """``inferopt.plugins.quantization.int8.modules`` -> ``inferopt.plugins.quantization``."""
    return ".".join(module.split(".")[:3])


def _plugin_files() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py"))


def test_plugins_are_grouped_by_kind():
    groups = {p.name for p in PLUGINS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups == {"backends", "commands", "distillation", "metrics", "pruning",
                      "quantization", "sources"}
    assert not [p.name for p in PLUGINS.glob("*.py") if p.name != "__init__.py"]


@pytest.mark.parametrize("path", _plugin_files(), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_built_in_plugins_use_only_the_public_api(path):
    here = _module_name(path)
    bad = []
    for name in _imports(ast.parse(path.read_text()), here, path.name == "__init__.py"):
        if not name.startswith("inferopt"):
            continue
        if name.startswith("inferopt._"):
            bad.append(f"{name} (private)")
        elif name.startswith("inferopt.plugins.") and _group_of(name) != _group_of(here):
            bad.append(f"{name} (another kind's plugin)")
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _doc_code() -> list[tuple[str, str]]:
    blocks = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), re.S)):
            blocks.append((f"{md.relative_to(ROOT)}#{i}", block))
    for py in sorted((ROOT / "docs").rglob("*.py")):
        blocks.append((str(py.relative_to(ROOT)), py.read_text()))
    template = PLUGINS / "commands" / "plugin_template"
    for tmpl in sorted(template.rglob("*.py.tmpl")):
        blocks.append((str(tmpl.relative_to(ROOT)), tmpl.read_text()))
    return blocks


def test_code_in_the_docs_imports_no_private_module():
    bad = []
    for where, code in _doc_code():
        for match in re.finditer(r"^\s*(?:from|import)\s+(inferopt(?:\.[\w.]+)?)(?=[\s,]|$)",
                                 code, re.M):
            name = match.group(1)
            if name not in PUBLIC:
                bad.append(f"{where}: {name}")
    assert not bad


def test_every_public_helper_is_documented():
    import inferopt.utils

    page = (ROOT / "docs" / "utilities.md").read_text()
    missing = [name for name in inferopt.utils.__all__ if f"### `{name}`" not in page]
    assert not missing, f"docs/utilities.md does not document {missing}"
    for name in inferopt.utils.__all__:  # and each resolves
        assert getattr(inferopt.utils, name) is not None


def test_there_are_no_import_cycles():
    modules = {_module_name(p): p for p in (SRC / "inferopt").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                # a submodule importing its own package's __init__ is how Python works
                if candidate in modules and candidate != name and not name.startswith(
                        candidate + "."):
                    edges.add(candidate)
        graph[name] = edges
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_entry_points_name_what_they_register():
    import importlib.metadata

    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="inferopt")
                    if ep.dist is not None and ep.dist.metadata["Name"] == "inferopt"}
    from inferopt._manager import PluginManager
    from inferopt._registry import load_plugins

    _manager, registry = load_plugins(PluginManager().load_entrypoints())
    for entry in registry.entries():
        if entry.plugin in entry_points:
            assert entry.name.startswith(entry.plugin) or entry.plugin in {"files"}, (
                f"entry point {entry.plugin!r} registers {entry.kind} {entry.name!r}")


# --- commands as plugins -----------------------------------------------------------------

HELLO = '''
import click
import inferopt


@inferopt.hookimpl
def inferopt_register_commands(cli):
    @cli.command("hello")
    @click.argument("name")
    def hello(name):
        """Say hello."""
        click.echo(f"hello {name}")
'''

CLASH = '''
import click
import inferopt


@inferopt.hookimpl
def inferopt_register_commands(cli):
    @cli.command("compare")
    def compare():
        click.echo("not the real compare")
'''

BROKEN = '''
import inferopt


@inferopt.hookimpl
def inferopt_register_commands(cli):
    raise RuntimeError("this plugin is broken")
'''

ORDERED = '''
import inferopt


@inferopt.hookimpl(tryfirst=True)
def inferopt_register_optimizers(register):
    pass
'''


def test_a_third_party_plugin_adds_a_command(cli, plugin_env):
    env = plugin_env("inferopt-hello", {"hello": "hello_plugin"}, {"hello_plugin": HELLO})
    result = cli("hello", "world", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello world"
    assert "hello" in cli("--help", env=env).stdout
    listing = json.loads(cli("plugins", "--json", env=env).stdout)
    plugin = next(p for p in listing["plugins"] if p["name"] == "hello")
    assert plugin["hooks"] == ["inferopt_register_commands"]
    # gone again without the plugin
    assert cli("hello", "world").returncode == 2


def test_built_in_commands_are_plugins_and_can_be_blocked(cli):
    assert cli("compare", "--help").returncode == 0
    blocked = cli("compare", "--help", env={"INFEROPT_BLOCK_PLUGINS": "compare"})
    assert blocked.returncode == 2 and "No such command 'compare'" in blocked.stderr
    # run and plugins belong to the core
    assert cli("plugins", "--help", env={"INFEROPT_PLUGINS": "int8"}).returncode == 0


def test_a_command_name_clash_or_a_broken_hook_costs_that_plugin_only(cli, plugin_env):
    env = plugin_env("inferopt-clash", {"clash": "clash_plugin", "broken": "broken_plugin"},
                     {"clash_plugin": CLASH, "broken_plugin": BROKEN})
    result = cli("compare", "nowhere", env=env)
    assert "not the real compare" not in result.stdout
    assert "no report here" in result.stderr  # the built-in compare still answers
    assert "tune" in cli("--help", env=env).stdout


def test_ordering_markers_are_refused_with_the_reason(cli, plugin_env):
    env = plugin_env("inferopt-ordered", {"ordered": "ordered_plugin"},
                     {"ordered_plugin": ORDERED})
    listing = json.loads(cli("plugins", "--json", env=env).stdout)
    [failure] = [f for f in listing["failed"] if f["name"] == "ordered"]
    assert "tryfirst" in failure["error"] and "inferopt_register_optimizers" in failure["error"]
