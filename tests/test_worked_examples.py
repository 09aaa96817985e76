"""The worked examples (docs/examples/inferopt-worked-examples): an ONNX Runtime backend, a
p99.9 latency metric and Conv-BatchNorm fusion, written from the docs alone. A real pip install
(kept out of the test environment with --target), then the example's own test suite, which uses
only the public fixtures of inferopt.testing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import pip_install, sh

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "inferopt-worked-examples"
ORT_TESTS = "tests/test_ort_backend.py"
ORT_MISSING = [m for m in ("onnxruntime", "onnx", "onnxscript")
               if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example package pip-installed into a folder of its own (deleting it uninstalls)."""
    target = tmp_path_factory.mktemp("worked-examples") / "site"
    pip_install(EXAMPLE, target)
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
