"""Shared fixtures: an isolated cache for the demo models, CLI runners, and a helper that
installs a plugin through a real entry point (a temporary ``*.dist-info`` on ``sys.path``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.helpers import make_plugin_dist, run_cli


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo models are trained once per test session into a private cache."""
    path = tmp_path_factory.mktemp("inferopt-cache")
    os.environ["INFEROPT_CACHE_DIR"] = str(path)
    for var in ("INFEROPT_PLUGINS", "INFEROPT_BLOCK_PLUGINS", "INFEROPT_STRICT_PLUGINS"):
        os.environ.pop(var, None)
    return path


@attrs.frozen
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``cli(*args, env=...)`` runs the CLI in process (click's runner) in a fresh working
    directory. A ``PYTHONPATH`` in ``env`` is put on ``sys.path`` for the call, so plugins in a
    temporary ``*.dist-info`` are found through their real entry points, as after ``pip install``.
    """
    from click.testing import CliRunner

    from inferopt._cli import main

    monkeypatch.chdir(tmp_path)

    def _run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        env = dict(env or {})
        paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p]
        before = set(sys.modules)
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            for path in reversed(paths):
                m.syspath_prepend(path)
            result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        for name in set(sys.modules) - before:  # forget the temporary plugin modules
            file = getattr(sys.modules[name], "__file__", None) or ""
            if any(file.startswith(p) for p in paths):
                del sys.modules[name]
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return _run


@pytest.fixture
def cli_subprocess(tmp_path: Path) -> Any:
    """Like ``cli`` but in a separate ``python -m inferopt`` process (slower; for the few
    tests that must see a fresh interpreter)."""

    def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=tmp_path, env=env)

    return _run


@pytest.fixture
def plugin_env(tmp_path: Path) -> Any:
    """``plugin_env(dist, entry_points, modules)`` -> env dict with the plugin on PYTHONPATH."""

    def _make(dist: str, entry_points: dict[str, str], modules: dict[str, str],
              version: str = "1.2.3") -> dict[str, str]:
        root = make_plugin_dist(tmp_path / f"site-{dist}", dist, version, entry_points, modules)
        old = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": str(root) + (os.pathsep + old if old else "")}

    return _make
