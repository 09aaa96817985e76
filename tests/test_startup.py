"""`inferopt --help` and `inferopt plugins` must stay light: they never import torch (nor the
runtimes the backends drive: onnxruntime, openvino, onnx).
(Their wall time is measured in benchmarks/bench_cli_startup.py, not asserted here.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
from inferopt._cli import main
try:
    main({args!r})
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
for heavy in ("torch", "onnxruntime", "openvino", "onnx"):
    assert heavy not in sys.modules, heavy + " was imported"
print("ok")
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["plugins"], ["plugins", "--json"], ["run", "--help"]]
)
def test_light_commands_do_not_import_torch(args):
    result = subprocess.run([sys.executable, "-c", CHECK.format(args=args)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_importing_inferopt_and_builtin_plugins_does_not_import_torch():
    code = ("import sys, importlib, importlib.metadata as m\n"
            "import inferopt\n"
            "for ep in m.entry_points(group='inferopt'): ep.load()\n"
            "for heavy in ('torch', 'onnxruntime', 'openvino', 'onnx'):\n"
            "    assert heavy not in sys.modules, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
