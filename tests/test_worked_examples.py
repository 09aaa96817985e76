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


def test_the_worked_examples_pass_their_tests(installed):
    """One pytest process for the three plugins (a process start with torch and onnx costs
    about 10 s); without onnxruntime the ort backend's tests are left out, and said so."""
    suite = pytest_example(installed, *(["--ignore", ORT_TESTS] if ORT_MISSING else []))
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert " passed" in suite.stdout and "skipped" not in suite.stdout, suite.stdout
    if ORT_MISSING:  # the metric's and the optimizer's tests ran; say what did not
        pytest.skip(f"the ort example backend needs {', '.join(ORT_MISSING)} "
                    "(pip install onnxruntime onnx onnxscript); its 5 tests were not run")
    assert "16 passed" in suite.stdout, suite.stdout  # 5 of them the ort backend's
