"""The worked examples in docs/model-sources.md (and the Python one in user-guide.md) run as
written.

Each ``<!-- example: NAME -->`` block is run line by line in a copy of the repository's docs/
folder, in process (``python SCRIPT ARGS`` as ``runpy`` with those arguments, ``inferopt ...``
through the CLI runner), which saves an interpreter start and a torch import per line. The one
change made to the commands is a shorter latency measurement (3 timed runs instead of 64 and
0.5 s), to keep the suite fast; the commands are otherwise exactly the documented ones.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
QUICK_LATENCY = "latency:min_runs=3,min_seconds=0,warmup=1"


def example_commands(name: str) -> list[str]:
    text = (DOCS / "model-sources.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"docs/model-sources.md has no example block {name!r}"
    return [line for line in match[1].splitlines() if line.strip()]


def run_example(name: str, cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    shutil.copytree(DOCS / "examples", tmp_path / "docs" / "examples",
                    ignore=shutil.ignore_patterns("inferopt-example-plugin"))
    reports = []
    for line in example_commands(name):
        args = shlex.split(line)
        if args[0] == "python":
            monkeypatch.chdir(tmp_path)
            monkeypatch.setattr(sys, "argv", args[1:])
            runpy.run_path(args[1], run_name="__main__")
            continue
        assert args[0] == "inferopt", line
        args = [QUICK_LATENCY if a == "latency" else a for a in args[1:]]
        result = cli(*args)
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        out = args[args.index("--out") + 1]
        reports.append(json.loads((tmp_path / out / "report.json").read_text()))
    return reports


def test_own_module_example_runs(cli, tmp_path, monkeypatch):
    (report,) = run_example("own-module", cli, tmp_path, monkeypatch)
    fidelity = report["optimized"]["metrics"]["fidelity"]
    assert fidelity["samples"] == 512  # --split eval=512
    assert fidelity["cosine"] > 0.99
    assert "speedup" in report["verdict"]
    assert report["steps"][0]["details"]["calibration"]["source"] == "calibration split"


def test_torch_export_example_runs_and_reloads(cli, tmp_path, monkeypatch, capsys):
    (report,) = run_example("torch-export", cli, tmp_path, monkeypatch)
    assert "quantized layers: 4; two loads agree: True" in capsys.readouterr().out
    assert report["steps"][0]["details"]["quantized"]  # the lifted layers were quantized
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.99
    assert report["verdict"]["size_ratio"] < 0.5


def test_transformers_example_runs(cli, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    (report,) = run_example("transformers-encoder", cli, tmp_path, monkeypatch)
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.99
    assert "speedup" in report["verdict"]


def test_user_guide_configs_as_values_example_runs(capsys):
    text = (DOCS / "user-guide.md").read_text()
    match = re.search(r"<!-- example: configs-as-values -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/user-guide.md has no example block 'configs-as-values'"
    namespace: dict = {}
    exec(compile(match[1], "docs/user-guide.md", "exec"), namespace)
    assert "Int8Quantizer(mode='static', skip=('2',)" in capsys.readouterr().out
    for model in (namespace["fast"], namespace["dynamic"]):
        assert type(model[0]).__name__ == "Int8Linear"
        assert isinstance(model[2], namespace["torch"].nn.Linear)  # skip=("2",)
