"""Reliability: every bad input in docs/reliability.md gets its exit code and one clear message
(no traceback without --debug); interrupted runs keep what the user had; failed steps are
named, undone with --keep-going; the same recipe and seed give the same bits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import inferopt
from inferopt._options import build
from inferopt._recipe import fields_from_mapping, parse_spec
from inferopt.plugins.pruning.optimizer import L1Pruner
from inferopt.plugins.quantization.int8.optimizer import Int8Quantizer
from tests.helpers import SMALL, make_plugin_dist

SMALL_MODEL = ["--model", "demo:digits-mlp-small"]

BREAKER = '''
import attrs, inferopt

@attrs.frozen
class Breaker(inferopt.Optimizer):
    """Writes NaN into every weight (a broken technique)."""
    name = "break-weights"
    def apply(self, model, ctx):
        import torch
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        return model

@attrs.frozen
class Raiser(inferopt.Optimizer):
    """Raises inside apply (a buggy plugin)."""
    name = "raise-error"
    def apply(self, model, ctx):
        raise RuntimeError("bug in the plugin")

@inferopt.hookimpl
def inferopt_register_optimizers(register):
    register(Breaker)
    register(Raiser)
'''


@pytest.fixture
def broken_plugin(tmp_path):
    root = make_plugin_dist(tmp_path / "plugins", "inferopt-breaker", "0.3",
                            {"breaker": "inferopt_breaker"}, {"inferopt_breaker": BREAKER})
    return {"PYTHONPATH": str(root)}


def _write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


# (row id, CLI args, expected exit status, text the one error line must contain)
ROWS = [
    ("unknown optimizer", ["-O", "int9"], 2, "unknown optimizer 'int9'. Available: "),
    ("unknown backend", ["-b", "tpu"], 2, "unknown backend 'tpu'. Available: cpu"),
    ("unknown metric", ["--metric", "latencyy"], 2, "Did you mean 'latency'?"),
    ("unknown option", ["-O", "int8:mod=static"], 2, "unknown option 'mod'"),
    ("bad option type", ["-O", "int8:calibration_batches=abc"], 2,
     "option 'calibration_batches' got 'abc'"),
    ("option out of range", ["-O", "prune-l1:sparsity=2"], 2,
     "option 'sparsity' got '2'; allowed: float >= 0.0 and <= 0.99"),
    ("model file missing", ["-m", "missing.py:build"], 2, "file 'missing.py' does not exist"),
    ("model does not import", ["-m", "{broken}:build", "-d", "synthetic:shape=8x64"], 2,
     "raised SyntaxError"),
    ("model is not a module", ["-m", "{models}:not_a_module", "-d", "synthetic:shape=8x64"], 2,
     "returned a int, not a torch.nn.Module"),
    ("no such callable", ["-m", "{models}:nothere", "-d", "synthetic:shape=8x64"], 2,
     "has no attribute 'nothere'"),
    ("data of the wrong shape", [*SMALL_MODEL, "-d", "synthetic:shape=8x3"], 2,
     "Check that the data's shape and dtype fit the model"),
    ("data of the wrong dtype", [*SMALL_MODEL, "-d", "synthetic:shape=8x64,dtype=int64"], 2,
     "Check that the data's shape and dtype fit the model"),
    ("empty data", [*SMALL_MODEL, "-d", "{data}:empty"], 2, "gave no batches"),
    ("batch larger than the data", [*SMALL_MODEL, "--batch-size", "5000"], 2,
     "--batch-size 5000 is larger than the data"),
    ("labels missing for accuracy", [*SMALL_MODEL, "-d", "synthetic:shape=8x64",
                                     "--metric", "accuracy"], 2, "needs labels"),
    ("step applied twice", [*SMALL_MODEL, "-O", "int8", "-O", "int8"], 2,
     "were already quantized by an earlier step"),
    ("CUDA without a GPU", [*SMALL_MODEL, "-b", "cuda"], 2, "no CUDA device"),
    ("untrusted pickle", ["-m", "{pickle}", "-d", "synthetic:shape=8x64"], 2, "--trust-model"),
    ("step makes outputs NaN", [*SMALL_MODEL, "-O", "break-weights"], 2,
     "made the model's outputs non-finite"),
    ("plugin raises in a step", [*SMALL_MODEL, "-O", "raise-error"], 2,
     "(plugin 'breaker' from inferopt-breaker 0.3) failed: RuntimeError: bug in the plugin"),
    ("accuracy collapses past the budget", [*SMALL_MODEL, "-O", "prune-l1:sparsity=0.97",
                                            "--metric", "accuracy", "--max-accuracy-drop", "1"],
     1, "step 1 'prune-l1' dropped accuracy top-1"),
    ("failed gate", [*SMALL_MODEL, "--metric", "size", "--max-size-ratio", "0.01"], 1,
     "gate failed: max_size_ratio"),
]


@pytest.mark.parametrize(("row", "args", "status", "message"), ROWS, ids=[r[0] for r in ROWS])
def test_every_bad_input_has_its_exit_status_and_one_clear_message(
        cli, tmp_path, broken_plugin, row, args, status, message):
    import torch

    files = {
        "broken": _write(tmp_path / "broken.py", "this is not python(\n"),
        "models": _write(tmp_path / "models.py", "def not_a_module():\n    return 42\n"),
        "data": _write(tmp_path / "data.py", "def empty():\n    return []\n"),
        "pickle": str(tmp_path / "model.pt"),
    }
    torch.save(torch.nn.Linear(64, 3), files["pickle"])
    argv = [a.format(**files) for a in args]
    result = cli("run", *argv, "--out", str(tmp_path / "out"), env=broken_plugin)
    assert result.returncode == status, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    if status == 2:
        assert not (tmp_path / "out").exists()  # nothing half-done was saved


def test_debug_shows_the_traceback(cli, broken_plugin):
    result = cli("run", *SMALL_MODEL, "-O", "raise-error", "--debug", env=broken_plugin)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_keep_going_runs_the_other_steps_and_marks_the_failed_one(cli, broken_plugin):
    result = cli("run", *SMALL, "-O", "break-weights", "-O", "int8", "--keep-going", "--json",
                 env=broken_plugin)
    assert result.returncode == 1
    assert "failed and were undone (--keep-going)" in result.stderr
    report = json.loads(result.stdout)
    failed, quantized = report["steps"]
    assert "non-finite" in failed["failed"] and quantized["failed"] is None
    assert "undone and the run went on (--keep-going)" in failed["failed"]
    assert quantized["details"]["quantized"]
    assert report["optimized"]["metrics"]["accuracy"]["top1"] > 0.8  # NaN weights were undone
    findings = [f["finding"] for f in report["verdict"]["findings"]]
    assert "step 1 'break-weights' failed and was undone" in findings
    # the saved run holds only the steps that stayed, so it loads
    manifest = json.loads((Path(report["artifacts"]["manifest"])).read_text())
    assert [s["name"] for s in manifest["steps"]] == ["int8"]
    loaded = inferopt.load(report["artifacts"]["dir"])
    assert type(loaded[0]).__name__ == "Int8Linear"


def test_a_broken_plugin_is_named_at_discovery_and_the_rest_still_work(cli, tmp_path):
    root = make_plugin_dist(tmp_path / "p", "inferopt-bad", "1.2", {"bad": "inferopt_bad"},
                            {"inferopt_bad": "raise ImportError('missing dependency xyz')\n"})
    result = cli("run", *SMALL_MODEL, "--metric", "size", env={"PYTHONPATH": str(root)})
    assert result.returncode == 0
    assert "plugin 'bad' (inferopt-bad) was not loaded: ImportError: missing dependency xyz" \
        in " ".join((result.stdout + result.stderr).split())
    strict = cli("run", *SMALL_MODEL, "--metric", "size", "--strict-plugins",
                 env={"PYTHONPATH": str(root)})
    assert strict.returncode == 2 and "inferopt-bad" in strict.stderr


def test_same_recipe_and_seed_give_the_same_bits(tmp_path):
    args = dict(model="demo:digits-mlp-small", metrics=["accuracy"], seed=3,
                optimize=["prune-activations:finetune_steps=20", "int8:mode=static"])
    a = inferopt.run(out=tmp_path / "a", **args)
    b = inferopt.run(out=tmp_path / "b", **args)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a.optimized["accuracy"] == b.optimized["accuracy"]


def test_ctrl_c_keeps_the_previous_output(tmp_path):
    """A SIGINT mid-run exits 130, says what was kept, and leaves the earlier run untouched."""
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "inferopt", "run", *SMALL_MODEL, "--metric",
                            "size", "--out", str(out)], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferopt", "run", *SMALL_MODEL, "--out", str(out),
         "--overwrite", "--metric", "latency:min_seconds=60,min_runs=100000000"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until it is timing (baseline and result, interleaved)
        if "measuring optimized model" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert "interrupted during measuring the optimized model: stopped cleanly" in rest
    assert f"{out} keeps its previous contents" in rest
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_spec_string_parses_or_fails_cleanly(text):
    try:
        spec = parse_spec(text, "--optimize")
    except inferopt.UsageError as exc:
        assert "--optimize" in str(exc)
    else:
        assert spec.name and ":" not in spec.name


option_values = st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=True),
                          st.booleans(), st.lists(st.text(max_size=5), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["sparsity", "structured", "skip", "iterations",
                                        "scope", "lr", "bogus", "round-to"]),
                       option_values, max_size=4),
       st.sampled_from([L1Pruner, Int8Quantizer]))
def test_any_option_values_convert_or_fail_cleanly(raw, cls):
    try:
        build(cls, raw, "step 1 'x'")
    except inferopt.UsageError as exc:
        assert str(exc).startswith("step 1 'x'")


toml_values = st.recursive(
    st.one_of(st.text(max_size=10), st.integers(), st.floats(), st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "data", "optimize", "metrics", "batch_size",
                                        "seed", "gates", "split", "backend", "keep_going",
                                        "nonsense"]), toml_values, max_size=5))
def test_any_recipe_document_gives_fields_or_a_clean_error(doc):
    try:
        fields_from_mapping(doc, "recipe r.toml")
    except inferopt.UsageError as exc:
        assert str(exc).startswith("recipe r.toml")


def test_an_interrupt_while_saving_puts_the_earlier_run_back(tmp_path, monkeypatch):
    """The window between moving the earlier run aside and moving the new one in (the
    two-rename path, used where the OS has no atomic exchange of directories)."""
    import pathlib

    from inferopt import _run_dir

    monkeypatch.setattr(_run_dir, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    inferopt.run(model="demo:digits-mlp-small", metrics=["size"], out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.startswith(".run.partial-"):
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(inferopt.InferoptError, match="keeps its previous contents"):
        inferopt.run(model="demo:digits-mlp-small", metrics=["size"], out=out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_interrupt_after_the_new_run_is_in_place_says_so(tmp_path, monkeypatch):
    import shutil

    from inferopt import _artifacts as artifacts
    from inferopt import _run_dir

    monkeypatch.setattr(_run_dir, "_exchange", lambda a, b: False)

    out = tmp_path / "run"
    inferopt.run(model="demo:digits-mlp-small", metrics=["size"], out=out)
    real_rmtree = shutil.rmtree
    calls = []

    def rmtree(path, *args, **kwargs):
        calls.append(path)
        if ".replaced-" in str(path) and len(calls) == 1:
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(artifacts.shutil, "rmtree", rmtree)
    with pytest.raises(inferopt.Interrupted, match="holds the new run"):
        inferopt.run(model="demo:digits-mlp-small", metrics=["size"], out=out, overwrite=True,
                     optimize=["prune-l1:structured=true"])
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the earlier run was removed
    manifest = json.loads((out / "inferopt.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["prune-l1"]
