"""The worked examples (docs/examples/inferopt-worked-examples): an ONNX Runtime backend, a
p99.9 latency metric and Conv-BatchNorm fusion, written from the docs alone. A real pip install
(kept out of the test environment with --target), then the example's own test suite, which uses
only the public fixtures of inferopt.testing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "inferopt-worked-examples"
ORT_TESTS = "tests/test_ort_backend.py"
ORT_MISSING = [m for m in ("onnxruntime", "onnx", "onnxscript")
               if importlib.util.find_spec(m) is None]


def sh(*args: str, cwd: Path | None = None, pythonpath: Path | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package pip-installed into a folder of its own (deleting it uninstalls)."""
    base = tmp_path_factory.mktemp("worked-examples")
    source, target = base / "src", base / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "__pycache__", "build", "*.egg-info"))
    result = sh(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                "--no-build-isolation", "--target", str(target), str(source))
    assert result.returncode == 0, result.stderr
    return target


def pytest_example(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
              cwd=EXAMPLE, pythonpath=target)


def test_metric_and_optimizer_examples_pass_their_tests(installed):
    suite = pytest_example(installed, "--ignore", ORT_TESTS)
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert " passed" in suite.stdout and "skipped" not in suite.stdout, suite.stdout


@pytest.mark.skipif(bool(ORT_MISSING), reason=f"the ort example backend needs "
                    f"{', '.join(ORT_MISSING)} (pip install onnxruntime onnx onnxscript)")
def test_onnx_runtime_backend_example_passes_its_tests(installed):
    suite = pytest_example(installed, ORT_TESTS)
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert "5 passed" in suite.stdout, suite.stdout
