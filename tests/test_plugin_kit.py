"""The plugin author's kit, end to end: the scaffold, the example package built from it, a real
pip install, the example's own test suite (on inferopt.testing), and uninstalling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inferopt.plugins.commands.new_plugin import plan, render

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "inferopt-example-plugin"
EXAMPLE_ARGS = {"name": "half", "dist": "inferopt-example-plugin", "metric": "flops"}


def sh(*args: str, cwd: Path | None = None, pythonpath: Path | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def pip_install(package: Path, target: Path) -> None:
    """A real install: pip builds the wheel and writes the dist-info with its entry points.
    --target keeps it out of the test environment; deleting the folder uninstalls it. The
    sources are copied first, because building writes build/ next to them."""
    source = target.parent / f"src-{package.name}"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns("__pycache__", "build"))
    result = sh(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                "--no-build-isolation", "--target", str(target), str(source))
    assert result.returncode == 0, result.stderr


def test_the_example_package_is_the_scaffold_output():
    expected = render(plan(**EXAMPLE_ARGS))
    actual = {
        str(p.relative_to(EXAMPLE)): p.read_text()
        for p in EXAMPLE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
    }
    assert actual == expected, ("docs/examples/inferopt-example-plugin is out of date; "
                                "regenerate it with: inferopt new-plugin half --dist "
                                "inferopt-example-plugin --metric flops --dir <that folder>")


def test_example_installs_lists_runs_passes_its_tests_and_uninstalls(tmp_path):
    target = tmp_path / "site"
    pip_install(EXAMPLE, target)

    listing = sh(sys.executable, "-m", "inferopt", "plugins", "--json", pythonpath=target)
    assert listing.returncode == 0, listing.stderr
    plugin = next(p for p in json.loads(listing.stdout)["plugins"] if p["name"] == "half")
    assert (plugin["distribution"], plugin["version"]) == ("inferopt-example-plugin", "0.1.0")
    assert plugin["hooks"] == ["inferopt_register_metrics", "inferopt_register_optimizers"]
    assert plugin["provides"]["optimizer"][0]["name"] == "half"
    assert plugin["provides"]["metric"][0]["name"] == "flops"

    run = sh(sys.executable, "-m", "inferopt", "run", "--model", "demo:digits-mlp-small",
             "--optimize", "half", "--optimize", "int8", "--metric", "flops", "--metric", "size",
             "--metric", "accuracy", "--json", "--out", str(tmp_path / "out"), pythonpath=target)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [s["name"] for s in report["steps"]] == ["half", "int8"]
    assert report["plugins"]["half"]["distribution"] == "inferopt-example-plugin"
    assert report["baseline"]["metrics"]["flops"]["flops_per_sample"] > 0

    suite = sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=EXAMPLE,
               pythonpath=target)
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert "4 passed" in suite.stdout

    shutil.rmtree(target)
    gone = sh(sys.executable, "-m", "inferopt", "plugins", "--json", pythonpath=target)
    assert "half" not in {p["name"] for p in json.loads(gone.stdout)["plugins"]}


def test_a_new_plugin_from_the_scaffold_works_out_of_the_box(tmp_path, cli):
    package = tmp_path / "inferopt-my-technique"
    result = cli("new-plugin", "my-technique", "--dir", str(package))
    assert result.returncode == 0, result.stderr
    assert (package / "inferopt_my_technique" / "__init__.py").is_file()
    target = tmp_path / "site"
    pip_install(package, target)
    suite = sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=package,
               pythonpath=target)
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert "4 passed" in suite.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["new-plugin", "My_Technique"], "use lowercase letters, digits and single dashes"),
    (["new-plugin", "ok", "--metric", "bad name"], "--metric 'bad name'"),
])
def test_scaffold_rejects_bad_names(cli, args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_scaffold_never_overwrites(cli, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    result = cli("new-plugin", "x", "--dir", str(tmp_path / "taken"))
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_testing_fixtures_are_available_to_any_test_suite(inferopt_registry, inferopt_cli,
                                                          inferopt_roundtrip):
    # inferopt.testing is loaded through the pytest11 entry point, here as for plugin authors
    assert "int8" in inferopt_registry.names("optimizer")
    assert inferopt_cli("plugins", "--json").returncode == 0
    report, _loaded = inferopt_roundtrip("int8", mode="static")
    assert report.steps[0].details["mode"] == "static"


@pytest.mark.parametrize(("args", "message"), [
    (["new-plugin", "int8"], "taken by a built-in inferopt plugin"),
    (["new-plugin", "ok", "--dist", "class"], "cannot be a Python package name"),
])
def test_scaffold_refuses_names_that_would_break(cli, args, message):
    result = cli(*args)
    assert result.returncode == 2 and message in result.stderr
