"""`inferopt run` as a user drives it: the demo, the report, errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import SMALL

MODELS_PY = '''
import torch

class DictIn(torch.nn.Module):
    """Takes keyword tensors, returns a dict with logits (like transformers models)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 5)
    def forward(self, features, scale):
        h = torch.relu(self.a(features)) * scale
        return {"logits": self.b(h), "hidden": h}

class TupleOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
    def forward(self, x, y):
        return self.a(x) + y, x.sum(-1)

def dict_model():
    return DictIn()

def dict_batches():
    g = torch.Generator().manual_seed(0)
    return [{"features": torch.randn(8, 32, generator=g), "scale": torch.ones(8, 1),
             "labels": torch.randint(0, 5, (8,), generator=g)} for _ in range(3)]

def tuple_model():
    return TupleOut()

def tuple_batches():
    import inferopt
    g = torch.Generator().manual_seed(0)
    return [inferopt.Batch(inputs=(torch.randn(4, 16, generator=g),
                                   torch.randn(4, 16, generator=g))) for _ in range(2)]

def not_a_model():
    return 42
'''


def test_demo_with_no_arguments_prints_table_and_saves(cli, tmp_path):
    result = cli("run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for row in ("latency p50", "throughput", "accuracy top-1", "size (saved weights)"):
        assert row in out
    assert "steps: int8" in out
    [run_dir] = list((tmp_path / "inferopt-runs").iterdir())
    for name in ("model.safetensors", "inferopt.json", "report.json", "report.md",
                 "recipe.json"):
        assert (run_dir / name).is_file()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["baseline"]["metrics"]["accuracy"]["top1"] > 0.95
    # int8 weights: about a quarter of the fp32 file
    assert report["comparison"]["size"]["bytes"]["ratio"] < 0.3


def test_json_report_schema_and_field_names(cli):
    result = cli("run", *SMALL, "--metric", "throughput:min_seconds=0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds only the JSON
    assert report["schema"] == "inferopt.report/1"
    base = report["baseline"]["metrics"]
    assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms"} <= set(base["latency"])
    assert "samples_per_s" in base["throughput"]
    assert 0.0 <= base["accuracy"]["top1"] <= 1.0
    assert {"cosine", "max_abs_err", "agreement"} <= set(report["optimized"]["metrics"]["fidelity"])
    assert base["size"]["bytes"] > 0
    [step] = report["steps"]
    assert step["name"] == "int8" and step["options"]["mode"] == "auto"
    assert step["details"]["mode"] == "dynamic"  # an MLP: auto picks dynamic
    assert step["seconds"] >= 0
    cmp = report["comparison"]["latency"]["p50_ms"]
    assert set(cmp) == {"baseline", "optimized", "ratio"}
    assert {"torch", "cpu", "threads"} <= set(report["environment"])
    assert Path(report["artifacts"]["model"]).name == "model.safetensors"
    assert report["recipe"]["optimize"] == ["int8"]
    assert report["plugins"]["int8"]["distribution"] == "inferopt"
    assert "run_id" in result.stderr  # logs went to stderr


def test_unknown_optimizer_exits_2_and_lists_available(cli):
    result = cli("run", "--optimize", "nosuch")
    assert result.returncode == 2
    assert "unknown optimizer 'nosuch'. Available: distill, int4, int8" in result.stderr
    assert "Traceback" not in result.stderr


def test_close_name_is_suggested(cli):
    result = cli("run", "--optimize", "int9")
    assert result.returncode == 2
    assert "Did you mean 'int8'?" in result.stderr


def test_bad_option_value_names_step_option_value_and_allowed(cli):
    result = cli("run", "--optimize", "int8:mode=turbo")
    assert result.returncode == 2
    assert ("step 1 'int8': option 'mode' got 'turbo'; allowed: one of auto, dynamic"
            in result.stderr)


def test_bad_backend_and_metric_options(cli):
    assert "backend 'cpu': option 'threads' got '-1'" in cli(
        "run", "--backend", "cpu:threads=-1").stderr
    assert "unknown metric 'latncy'" in cli("run", "--metric", "latncy").stderr


def test_existing_out_dir_is_not_overwritten_without_flag(cli, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result = cli("run", *SMALL, "--out", str(out))
    assert result.returncode == 2
    assert "already exists and is not empty" in result.stderr
    assert (out / "precious.txt").read_text() == "mine"
    # --overwrite replaces earlier runs only, never a folder of other files
    result = cli("run", *SMALL, "--out", str(out), "--overwrite")
    assert result.returncode == 2
    assert "holds files that are not an inferopt run" in result.stderr
    assert (out / "precious.txt").read_text() == "mine"
    run_dir = tmp_path / "run"
    assert cli("run", *SMALL, "--out", str(run_dir)).returncode == 0
    first = (run_dir / "report.json").read_text()
    result = cli("run", *SMALL, "--out", str(run_dir), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "report.json").read_text() != first
    assert not list(tmp_path.glob(".run.*"))


def test_out_may_not_be_the_working_directory_or_above(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for out in (".", str(tmp_path), str(tmp_path.parent)):
        result = cli("run", *SMALL, "--out", out, "--overwrite")
        assert result.returncode == 2
        assert "is the current directory or contains it" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_gate_exits_1_but_keeps_results(cli, tmp_path):
    result = cli("run", *SMALL, "--min-speedup", "1000", "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "gate failed: min_speedup" in result.stderr
    assert "gate min_speedup >= 1000.0: FAILED" in result.stdout
    assert (tmp_path / "o" / "report.json").is_file()


def test_passing_gate_exits_0(cli):
    result = cli("run", *SMALL, "--max-accuracy-drop", "5", "--max-size-ratio", "0.5")
    assert result.returncode == 0, result.stderr


def test_gate_without_its_metric_is_a_usage_error(cli):
    result = cli("run", "--model", "demo:digits-mlp-small", "--metric", "size",
                 "--max-accuracy-drop", "1")
    assert result.returncode == 2
    assert "gate max_accuracy_drop needs the 'accuracy' metric" in result.stderr


def test_same_recipe_twice_gives_same_accuracy(cli, tmp_path):
    # separate caches: the result does not depend on what a cache holds (training itself is
    # seeded: tests/plugins/sources/test_demo.py)
    reports = []
    for i in range(2):
        env = {"INFEROPT_CACHE_DIR": str(tmp_path / f"cache{i}")}
        result = cli("run", *SMALL, "--json", env=env)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(result.stdout))
    acc = [(r["baseline"]["metrics"]["accuracy"], r["optimized"]["metrics"]["accuracy"])
           for r in reports]
    assert acc[0] == acc[1]


def test_toml_recipe_with_flag_override(cli, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'model = "demo:digits-mlp-small"\nmetrics = ["accuracy", "size"]\n'
        '[[optimize]]\nname = "int8"\nskip = ["2"]\n'
    )
    result = cli("run", str(recipe), "--json", "--batch-size", "100")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["recipe"]["batch_size"] == 100
    assert report["steps"][0]["details"]["skipped"] == {"2": "matches skip pattern '2'"}
    assert report["recipe"]["optimize"] == ["int8:skip=2"]


def test_python_file_model_with_keyword_inputs_and_dict_outputs(cli, tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    result = cli("run", "--model", "mymodels.py:dict_model", "--data", "mymodels.py:dict_batches",
                 "--metric", "accuracy", "--metric", "fidelity", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.99
    assert report["steps"][0]["details"]["quantized"] == ["a", "b"]


def test_python_module_spec_with_positional_inputs_and_tuple_outputs(cli, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("run", "--model", "python:mymodels:tuple_model",
                 "--data", "python:mymodels:tuple_batches", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped_metrics"]["accuracy"].endswith("has no labels")
    assert report["optimized"]["metrics"]["fidelity"]["cosine"] > 0.99


def test_data_that_does_not_fit_the_model_is_a_usage_error(cli, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli("run", "--model", "python:mymodels:tuple_model",
                 "--data", "python:mymodels:dict_batches", "--json")
    # dict_batches gives keyword inputs named for DictIn, which TupleOut does not take
    assert result.returncode == 2
    assert "failed on the first batch" in result.stderr


def test_data_without_labels_skips_default_accuracy_but_rejects_explicit(cli, tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    args = ["run", "--model", "mymodels.py:dict_model"]
    (tmp_path / "nolabels.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    return [{'features': torch.randn(4, 32), 'scale': torch.ones(4, 1)}]\n"
    )
    ok = cli(*args, "--data", "nolabels.py:batches", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert "accuracy" in report["skipped_metrics"]
    assert "accuracy" not in report["optimized"]["metrics"]
    bad = cli(*args, "--data", "nolabels.py:batches", "--metric", "accuracy")
    assert bad.returncode == 2
    assert "metric 'accuracy' needs labels" in bad.stderr


def test_bad_model_specs_are_clear(cli, tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    cases = {
        "missing.py:build": "file 'missing.py' does not exist",
        "python:no_such_module_xyz:build": "cannot import module 'no_such_module_xyz'",
        "mymodels.py:nothing_here": "has no attribute 'nothing_here'",
        "mymodels.py:not_a_model": "returned a int, not a torch.nn.Module",
        "weird-spec": "no installed model source reads it",
    }
    for spec, message in cases.items():
        result = cli("run", "--model", spec, "--data", "synthetic:shape=2x32")
        assert result.returncode == 2, spec
        assert message in result.stderr, (spec, result.stderr)
        assert "Traceback" not in result.stderr


def test_model_without_data_asks_for_data(cli, tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    result = cli("run", "--model", "mymodels.py:dict_model")
    assert result.returncode == 2
    assert "needs data: give --data SPEC" in result.stderr


def test_synthetic_data_errors(cli):
    result = cli("run", "--data", "synthetic:shape=64by64")
    assert result.returncode == 2
    assert "write positive sizes separated by x" in result.stderr


def test_log_format_json(cli):
    result = cli("run", *SMALL, "--log-format", "json", "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    steps = [e for e in events if e.get("event") == "applying step"]
    assert steps and steps[0]["step"] == 1 and steps[0]["plugin"] == "int8"
    assert all("run_id" in e for e in events)


def test_blocked_default_metric_is_left_out(cli):
    result = cli("run", "--model", "demo:digits-mlp-small", "--json",
                 env={"INFEROPT_BLOCK_PLUGINS": "throughput,latency"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["baseline"]["metrics"]) == {"accuracy", "fidelity", "size"}


def test_model_that_fails_on_a_later_batch_is_a_usage_error(cli, tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def model():\n    return torch.nn.Linear(4, 2)\n"
        "def data():\n    return [torch.randn(3, 4), torch.randn(3, 5)]\n"
    )
    result = cli("run", "--model", "m.py:model", "--data", "m.py:data")
    assert result.returncode == 2
    assert "failed on batch 1 of 'm.py:data'" in result.stderr
