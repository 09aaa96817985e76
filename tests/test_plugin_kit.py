"""The plugin author's kit, end to end: the scaffold, the example package built from it, a real
pip install, the example's own test suite (on inferopt.testing), and uninstalling."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

import inferopt
from inferopt.plugins.commands.new_plugin import KINDS, plan, render
from tests.helpers import pip_install, sh

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "inferopt-example-plugin"
EXAMPLE_ARGS = {"name": "half", "dist": "inferopt-example-plugin", "metric": "flops"}


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
    assert "5 passed" in suite.stdout

    shutil.rmtree(target)
    gone = sh(sys.executable, "-m", "inferopt", "plugins", "--json", pythonpath=target)
    assert "half" not in {p["name"] for p in json.loads(gone.stdout)["plugins"]}


# a real pip install (15 s); the example package's install test covers the default output
@pytest.mark.slow
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
    assert "5 passed" in suite.stdout


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


OTHER_KINDS = {  # kind -> (base class, discovery hook)
    "backend": (inferopt.Backend, "inferopt_register_backends"),
    "metric": (inferopt.Metric, "inferopt_register_metrics"),
    "source": (inferopt.ModelSource, "inferopt_register_models"),
    "command": (None, "inferopt_register_commands"),
}


@pytest.mark.parametrize("kind", sorted(OTHER_KINDS))
def test_each_kind_writes_a_package_whose_module_imports_and_registers_one_plugin(
        cli, tmp_path, monkeypatch, kind):
    assert set(KINDS) == {"optimizer", *OTHER_KINDS}
    package = tmp_path / f"pkg-{kind}"
    result = cli("new-plugin", f"my-{kind}", "--kind", kind, "--dir", str(package))
    assert result.returncode == 0, result.stderr
    module = f"inferopt_my_{kind}"
    assert sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file()) == [
        "README.md", f"{module}/__init__.py", "pyproject.toml", f"tests/test_{module}.py"]
    assert f'my-{kind} = "{module}"' in (package / "pyproject.toml").read_text()
    monkeypatch.syspath_prepend(str(package))
    mod = importlib.import_module(module)
    base, hook = OTHER_KINDS[kind]
    registered = []
    if kind == "command":
        getattr(mod, hook)(type("Cli", (), {"add_command": staticmethod(registered.append)}))
        assert registered[0].name == f"my-{kind}"
    else:
        getattr(mod, hook)(registered.append)
        assert issubclass(registered[0], base)
        assert getattr(registered[0], "scheme", getattr(registered[0], "name", None)) == \
            f"my-{kind}"
    compile((package / "tests" / f"test_{module}.py").read_text(), "test", "exec")


def test_metric_option_belongs_to_optimizer_plugins(cli, tmp_path):
    result = cli("new-plugin", "x", "--kind", "backend", "--metric", "y",
                 "--dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "--metric names the metric of an optimizer" in result.stderr
    assert not (tmp_path / "x").exists()


# one pip install of four packages (22 s); each kind's files are checked fast above
@pytest.mark.slow
def test_every_kind_installs_and_passes_its_own_tests(tmp_path, cli):
    # one pip install and one pytest session for all kinds (about 40 s on 2 cores)
    packages = []
    for kind in sorted(OTHER_KINDS):
        package = tmp_path / f"inferopt-my-{kind}"
        assert cli("new-plugin", f"my-{kind}", "--kind", kind,
                   "--dir", str(package)).returncode == 0
        packages.append(package)
    target = tmp_path / "site"
    sources = []
    for package in packages:
        source = tmp_path / f"src-{package.name}"
        shutil.copytree(package, source)
        sources.append(str(source))
    result = sh(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                "--no-build-isolation", "--target", str(target), *sources)
    assert result.returncode == 0, result.stderr
    suite = sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               *[str(p / "tests") for p in packages], cwd=tmp_path, pythonpath=target)
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert "13 passed" in suite.stdout
