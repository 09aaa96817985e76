"""``inferopt tune``: the search, its study, resuming, the sensitivity fallback, the chosen
model, and the exit status when nothing meets the goal. All on demo:digits-mlp-small with few
latency runs, so each trial takes a fraction of a second. Several workers on one study:
test_tune_workers.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inferopt import Interrupted
from tests.helpers import QUITS_PLUGIN

FAST = ["--model", "demo:digits-mlp-small",
        "--metric", "latency:min_runs=60,min_seconds=0,warmup=2"]


def _doc(out: Path) -> dict[str, Any]:
    return json.loads((out / "tune.json").read_text())


def _log_trials(out: Path) -> list[dict[str, Any]]:
    """The measured trials in the study (not the accuracy-only sensitivity runs)."""
    return [t for t in _study_trials(out) if t["state"] in ("COMPLETE", "FAIL")
            and "status" in t and t.get("phase") != "sensitivity"]


def _study_trials(out: Path) -> list[dict[str, Any]]:
    import optuna

    from inferopt.plugins.commands.tune.search import attrs_of

    study = optuna.load_study(study_name="inferopt-tune", storage=f"sqlite:///{out}/study.db")
    return [attrs_of(t) for t in study.get_trials()]


def test_tune_picks_a_faster_candidate_within_one_point(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    result = cli("tune", *FAST, "--max-accuracy-drop", "1.0", "--budget-minutes", "3",
                 "-t", "prune-activations", "-t", "int8", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["seconds"] < 180  # finished within its time budget
    assert doc["stopped"] is None  # by exhausting the space, not by a limit
    chosen = next(t for t in doc["trials"] if t["id"] == doc["chosen"])
    assert chosen["latency_verdict"] == "faster" and chosen["speedup_ci"][0] > 1.0
    assert chosen["accuracy_drop_points"] <= 1.0 and chosen["meets_goal"]
    # every trial is in the document, the table and the log; each one A/B-timed
    keys = [t["key"] for t in doc["trials"]]
    assert keys[0] == "none" and "int8" in keys and "prune-activations" in keys
    assert "int8:mode=static" in keys and "prune-activations:sparsity=0.25" in keys
    assert [t["key"] for t in _log_trials(out)] == keys
    for t in _log_trials(out):
        assert t["report"]["paired"]["latency"]["method"].startswith("interleaved A/B")
    markdown = (out / "tune.md").read_text()
    assert all(k.replace("|", "\\|") in markdown for k in keys)
    assert set(doc["pareto"]) <= {t["id"] for t in doc["trials"]} and doc["pareto"]
    # the chosen model is saved like a run and loads with inferopt.load
    import inferopt
    from tests.helpers import demo_correct

    model = inferopt.load(out / "best")
    best_report = json.loads((out / "best" / "report.json").read_text())
    assert [s["name"] for s in best_report["steps"]] == [s["name"] for s in chosen["steps"]]
    correct = demo_correct(model)
    assert abs(correct / 359 - chosen["accuracy"]) < 1e-9


def test_impossible_budget_exits_1_with_the_three_closest(cli: Any, tmp_path: Path) -> None:
    import os

    out = tmp_path / "tune"
    # an earlier choice, and what a worker killed while it discarded one left (its pid reused)
    (out / "best").mkdir(parents=True)
    (out / "best" / "inferopt.json").write_text("{}")
    (out / f".best.discarded-{os.getpid()}").mkdir()
    (out / f".best.discarded-{os.getpid()}" / "model.safetensors").write_text("half")
    (out / ".tune.running").touch()
    result = cli("tune", *FAST, "--max-accuracy-drop", "0.0", "--out", str(out),
                 "-t", "prune-l1:structured=true,sparsity=0.9",
                 "-t", "prune-activations:sparsity=0.9")
    assert result.returncode == 1
    assert "no candidate met the goal" in result.stderr
    closest = [line for line in result.stderr.splitlines() if "closest" in line]
    assert len(closest) == 3
    doc = _doc(out)
    assert doc["chosen"] is None and len(doc["closest"]) == 3
    drops = [next(t for t in doc["trials"] if t["id"] == i)["accuracy_drop_points"]
             for i in doc["closest"]]
    assert drops == sorted(drops) and drops[0] > 0
    assert not (out / "best").exists() and not list(out.glob(".best.discarded-*"))
    # when the fallback ran, a layer the pruners cannot leave out is said, not hidden
    assert all(s["status"] == "ok" or "found no layer" in s["error"] for s in doc["sensitivity"])


def test_sensitivity_fallback_keeps_the_most_sensitive_layer_in_float(
        cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    result = cli("tune", *FAST, "--max-accuracy-drop", "0.5", "--objective", "size",
                 "--out", str(out), "-t", "int4:bits=2,group_size=128,method=rtn")
    doc = _doc(out)
    whole = doc["trials"][1]
    assert whole["accuracy_drop_points"] > 0.5  # the whole-model technique broke the budget
    sens = {s["layer"]: whole["accuracy_drop_points"] - s["accuracy_drop_points"]
            for s in doc["sensitivity"]}
    assert set(sens) == {"0", "2"}  # each layer left out once, accuracy only
    most = max(sens, key=lambda n: sens[n])
    retry = next(t for t in doc["trials"] if t["phase"] == "sensitivity-retry")
    assert retry["steps"][0]["options"]["skip"] == [most]
    assert retry["accuracy_drop_points"] < whole["accuracy_drop_points"]
    if retry["within_budget"]:
        assert result.returncode == 0 and doc["chosen"] == retry["id"]


def test_interrupted_tune_continues_from_its_log(cli: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import inferopt._pipeline as pipeline

    out = tmp_path / "tune"
    args = ["tune", *FAST, "--out", str(out), "-t", "int8", "-t", "prune-l1", "--json"]
    real_run = pipeline.run
    calls = {"n": 0}

    def interrupted_on_the_fourth(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # what the pipeline raises on Ctrl-C
            raise Interrupted("interrupted during measuring the optimized model: stopped "
                              "cleanly; nothing was saved")
        return real_run(*a, **k)

    monkeypatch.setattr(pipeline, "run", interrupted_on_the_fourth)
    first = cli(*args)
    assert first.returncode == 130 and "rerun the same command to continue" in first.stderr
    logged = [t["key"] for t in _log_trials(out)]
    assert len(logged) == 3
    # the trial Ctrl-C stopped is in the study as failed, without a result: it runs again
    stopped = [t for t in _study_trials(out) if t.get("interrupted")]
    assert len(stopped) == 1 and stopped[0]["state"] == "FAIL" and "status" not in stopped[0]
    monkeypatch.setattr(pipeline, "run", real_run)
    calls["n"] = 0
    second = cli(*args)
    assert second.returncode in (0, 1), second.stderr
    doc = json.loads(second.stdout)
    assert [t["key"] for t in doc["trials"]][:3] == logged
    assert all(t["replayed"] for t in doc["trials"][:3])
    assert not any(t["replayed"] for t in doc["trials"][3:]) and len(doc["trials"]) > 3
    assert stopped[0]["key"] in [t["key"] for t in doc["trials"][3:]]
    keys = [t["key"] for t in _log_trials(out)]
    assert len(keys) == len(set(keys)) == len(doc["trials"])  # nothing ran twice
    # a different baseline cannot reuse the log
    other = cli("tune", "--model", "demo:digits-mlp-small", "--seed", "1", "--out", str(out))
    assert other.returncode == 2 and "different baseline" in other.stderr
    assert "seed" in other.stderr


def test_limits_stop_the_search_and_say_so(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    result = cli("tune", *FAST, "--out", str(out), "--trials", "2", "--json",
                 "-t", "int8", "-t", "prune-l1")
    doc = json.loads(result.stdout)
    assert len(doc["trials"]) == 3  # the A/A baseline and two trials
    assert doc["stopped"].startswith("trial limit reached (2 trials)")
    out2 = tmp_path / "tune2"
    result = cli("tune", *FAST, "--out", str(out2), "--budget-minutes", "0.001", "--json")
    doc = json.loads(result.stdout)
    assert doc["stopped"].startswith("time budget reached")
    assert [t["key"] for t in doc["trials"]] == ["none"]
    assert result.returncode == 1


def test_third_party_searchable_options_join_the_search(cli: Any, plugin_env: Any,
                                                        tmp_path: Path) -> None:
    module = '''
        import attrs
        from inferopt import Optimizer, hookimpl, option

        @attrs.frozen
        class RoundWeights(Optimizer):
            """Round every weight to a number of decimals."""
            name = "round-weights"
            decimals: int = option(3, min=0, searchable=(3, 1, 0))

            def apply(self, model, ctx):
                import torch
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(torch.round(p, decimals=self.decimals))
                return model

        @hookimpl
        def inferopt_register_optimizers(register):
            register(RoundWeights)
    '''
    env = plugin_env("inferopt-rounding", {"rounding": "rounding_plugin"},
                     {"rounding_plugin": module})
    listing = json.loads(cli("plugins", "--json", env=env).stdout)
    plugin = next(p for p in listing["plugins"] if p["name"] == "rounding")
    option = plugin["provides"]["optimizer"][0]["options"][0]
    assert option["searchable"] == [3, 1, 0]
    out = tmp_path / "tune"
    result = cli("tune", *FAST, "--out", str(out), "--objective", "size", "--json",
                 "-t", "round-weights", env=env)
    doc = json.loads(result.stdout)
    keys = [t["key"] for t in doc["trials"]]
    # the A/A trial and the defaults first; the sampler picks the order of the rest
    assert keys[:2] == ["none", "round-weights"]
    assert sorted(keys[2:]) == ["round-weights:decimals=0", "round-weights:decimals=1"]
    assert doc["space"][0]["distribution"] == "inferopt-rounding"
    # rounding keeps float32 weights: never smaller, so nothing meets a size goal
    assert result.returncode == 1 and doc["chosen"] is None


def test_default_space_lists_the_builtins_searchable_options() -> None:
    import inferopt
    from inferopt.plugins.commands.tune.search import search_space

    space, notes = search_space(inferopt.Session(), ())
    by_name = {t.name: t for t in space}
    assert {"int8", "int4", "prune-l1", "prune-activations", "distill"} <= set(by_name)
    assert by_name["int8"].dims == {"mode": ["auto", "dynamic", "static"],
                                    "granularity": ["per-channel", "per-tensor"],
                                    "smooth": ["auto", 0.0]}
    assert by_name["prune-l1"].dims == {"sparsity": [0.5, 0.25], "structured": [False, True]}
    assert by_name["distill"].dims == {"ratio": [0.25, 0.5]}
    # cheap kinds first: quantization, pruning, then distillation
    kinds = [t.kind for t in space if t.name in by_name]
    assert kinds.index("quantization") < kinds.index("pruning") < kinds.index("distillation")
    assert notes == []


def test_bad_tune_input_is_a_usage_error(cli: Any, tmp_path: Path) -> None:
    result = cli("tune", "--model", "demo:digits-mlp-small", "-t", "int9")
    assert result.returncode == 2 and "unknown optimizer 'int9'" in result.stderr
    result = cli("tune", "--model", "demo:digits-mlp-small", "-t", "int8:mode=fast")
    assert result.returncode == 2 and "mode" in result.stderr
    result = cli("tune", "--max-accuracy-drop", "lots")
    assert result.returncode == 2 and "--max-accuracy-drop" in result.stderr
    out = tmp_path / "undirected"
    result = cli("tune", "--model", "demo:digits-mlp-small", "--objective", "latency.runs",
                 "--out", str(out))  # refused before the baseline is loaded or a trial runs
    assert result.returncode == 2 and "not a quantity with a direction" in result.stderr
    assert "latency.p50_ms" in result.stderr and not out.exists()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    result = cli("tune", "--model", "demo:digits-mlp-small", "--out", str(stray))
    assert result.returncode == 2 and "not an earlier tune" in result.stderr


def test_bad_input_is_exit_2_and_a_changed_dataset_is_not_mixed_in(cli: Any,
                                                                   tmp_path: Path) -> None:
    import numpy as np

    big = cli("tune", *FAST, "-t", "int8", "--trials", "1", "--batch-size", "5000",
              "--out", str(tmp_path / "big"))
    assert big.returncode == 2 and "--batch-size 5000 is larger than the data" in big.stderr
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, inputs=rng.random((64, 64), dtype=np.float32),
             labels=rng.integers(0, 10, 64))
    args = ["tune", *FAST, "--data", str(data), "-t", "int8", "--trials", "1",
            "--out", str(tmp_path / "t")]
    assert cli(*args).returncode in (0, 1)
    np.savez(data, inputs=rng.random((64, 64), dtype=np.float32),
             labels=rng.integers(0, 10, 64))  # same name and size, other samples
    again = cli(*args)
    assert again.returncode == 2 and "holds a tune of a different baseline" in again.stderr




def test_a_trial_that_calls_sys_exit_fails_alone_and_the_search_goes_on(
        cli: Any, plugin_env: Any, tmp_path: Path) -> None:
    """sys.exit() in a plugin's step stopped tune after its first trial, exit 0, nothing
    saved; now that trial fails with the reason and the other trials run."""
    env = plugin_env("inferopt-quits", {"quits": "quits_plugin"},
                     {"quits_plugin": QUITS_PLUGIN})
    out = tmp_path / "tune"
    result = cli("tune", *FAST, "--out", str(out), "--trials", "3", "--json",
                 "-t", "quits", "-t", "int8", env=env)
    doc = json.loads(result.stdout)
    keys = [t["key"] for t in doc["trials"]]
    assert any(k.startswith("quits") for k in keys) and any(k.startswith("int8") for k in keys)
    failed = next(t for t in doc["trials"] if t["key"].startswith("quits"))
    assert "SystemExit" in json.dumps(failed)


def test_a_trial_failed_by_another_worker_meanwhile_does_not_stop_the_search(
        cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker that takes a running trial's heartbeat for stale (a loaded machine) fails
    it and enqueues it again while its worker still runs it. Optuna then cannot record the
    result ('Cannot tell a FAIL trial', or its own AssertionError), which ended the worker with
    exit 2 (seen once with two workers under heavy load). Now the worker says so, leaves the
    trial to its retry and goes on."""
    import optuna

    from inferopt.plugins.commands.tune import search

    out = tmp_path / "tune"
    real_record = search.record
    calls = {"n": 0}

    def record(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # what fail_stale_trials in another worker does
            study = optuna.load_study(study_name="inferopt-tune",
                                      storage=f"sqlite:///{out}/study.db")
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        return real_record(*args, **kwargs)

    monkeypatch.setattr(search, "record", record)
    result = cli("tune", *FAST, "--out", str(out), "--trials", "2", "--json", "-t", "int8",
                 "-t", "prune-l1")
    assert result.returncode in (0, 1), result.stderr
    assert "finished by another worker while it ran" in result.stderr
    assert "could not be recorded (Cannot tell a FAIL trial.)" in result.stderr
    doc = json.loads(result.stdout)
    # the lost trial is not in the summary; the search still ran its two candidates
    assert len([t for t in doc["trials"] if t["phase"] != "baseline"]) == 2


def test_a_study_refuses_another_kind_of_machine_and_an_old_trial_log(cli: Any,
                                                                      tmp_path: Path) -> None:
    import optuna

    out = tmp_path / "tune"
    args = ["tune", *FAST, "-t", "int8", "--trials", "1", "--out", str(out)]
    assert cli(*args).returncode in (0, 1)
    trials = _log_trials(out)
    assert trials and all(t["machine"]["torch"] and t["machine"]["cpu_flags"] is not None
                          for t in trials)  # every trial says where it ran
    study = optuna.load_study(study_name="inferopt-tune", storage=f"sqlite:///{out}/study.db")
    machine = dict(study.user_attrs["machine"])
    machine.update(cpu_flags=[*machine["cpu_flags"], "amx_tile_test"], torch="0.0-other")
    study.set_user_attr("machine", machine)
    again = cli(*args)
    assert again.returncode == 2 and "another kind of machine" in again.stderr
    assert "amx_tile_test" in again.stderr and "0.0-other" in again.stderr
    old = tmp_path / "old"
    old.mkdir()
    (old / "trials.jsonl").write_text('{"type": "header", "schema": "inferopt.tune/1"}\n')
    result = cli("tune", *FAST, "--out", str(old))
    assert result.returncode == 2 and "trials.jsonl" in result.stderr
    assert "--restart" in result.stderr


def test_tune_json_names_its_study(cli, tmp_path):
    out = tmp_path / "t"
    result = cli("tune", "--model", "demo:digits-mlp-small", "--trials", "1", "-t", "int8",
                 "--metric", "latency:min_runs=5,min_seconds=0,warmup=1", "--out", str(out))
    assert result.returncode in (0, 1), result.stderr
    doc = json.loads((out / "tune.json").read_text())
    assert doc["artifacts"]["study"].startswith("sqlite:///")
    assert doc["artifacts"]["study_name"] == "inferopt-tune" and "study" not in doc


def test_grid_sampler_visits_the_space_in_order_and_the_study_keeps_it(cli: Any,
                                                                      tmp_path: Path) -> None:
    import inferopt
    from inferopt.plugins.commands.tune.search import key_of, search_space
    from inferopt.utils import parse_spec

    out = tmp_path / "tune"
    args = ["tune", *FAST, "-t", "prune-activations", "--objective", "size",
            "--max-accuracy-drop", "100", "--out", str(out)]
    result = cli(*args, "--sampler", "grid", "--json")
    assert result.returncode == 0, result.stderr
    space, _notes = search_space(inferopt.Session(), (parse_spec("prune-activations", "-t"),))
    points = [key_of([p]) for p in space[0].points()]
    assert len(points) == 6  # sparsity 0.5, 0.25 x criterion reconstruct, variance, mean
    # the baseline, the defaults (the first point), then the rest of the space in its order
    trials = [t for t in _study_trials(out) if "skipped" not in t]
    assert [t["key"] for t in trials] == ["none", *points]
    assert [t["phase"] for t in trials] == ["baseline", "single", *["search"] * 5]
    assert json.loads(result.stdout)["settings"]["sampler"] == "grid"
    # a worker with another sampler is refused: the study's plan is the grid's
    other = cli(*args, "--sampler", "tpe")
    assert other.returncode == 2
    assert "searches another sampler (--sampler: grid, here tpe)" in other.stderr


def test_a_worker_waits_while_another_creates_the_study_tables(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """Two workers starting together on a new PostgreSQL database: the second one's CREATE
    TABLE met the first one's (DuplicateTable, a ProgrammingError) and it stopped with exit 2
    (seen once in the PostgreSQL test); it now retries as it does on SQLite's errors."""
    import types

    import optuna.storages

    from inferopt.plugins.commands.tune import search

    class ProgrammingError(Exception):
        pass

    real, calls = optuna.storages.RDBStorage, {"n": 0}

    def racing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ProgrammingError('(psycopg.errors.DuplicateTable) relation "studies" already '
                                   "exists")
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(search.time, "sleep", lambda _s: None)
    storage = search.Worker._storage(types.SimpleNamespace(heartbeat=1.0),
                                     f"sqlite:///{tmp_path / 'study.db'}")
    assert isinstance(storage, real) and calls["n"] == 2


def test_try_backend_runs_candidates_there_against_the_baseline_on_backend(
        cli: Any, plugin_env: Any, tmp_path: Path) -> None:
    from tests.plugins.backends.test_runtime_backends import _install

    env, out = _install(plugin_env), tmp_path / "t"
    args = ["tune", *FAST, "-t", "int8", "--max-accuracy-drop", "100", "--trials", "3",
            "--out", str(out)]
    result = cli(*args, "--try-backend", "plain-callable", "--json", env=env)
    assert result.returncode in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"]["try_backends"] == ["plain-callable"]
    by_key = {t["key"]: t for t in doc["trials"]}
    assert set(by_key) == {"none", "int8", "none @ plain-callable", "int8 @ plain-callable"}
    there = by_key["none @ plain-callable"]  # the runtime alone is a candidate too
    assert there["status"] == "ok" and there["backend"] == "plain-callable"
    assert by_key["int8"]["backend"] is None
    # a step the backend refuses fails its trial: it would measure another recipe
    refused = by_key["int8 @ plain-callable"]
    assert refused["status"] == "failed" and "no int8 kernels" in refused["error"]
    # the trials' baselines ran on --backend (cpu): the runtime prepared optimized models only
    roles = {json.loads(line)["role"] for line in
             (tmp_path / "prepare-calls.jsonl").read_text().splitlines()}
    assert roles == {"optimized"}
    other = cli(*args, env=env)  # the study tried another set of backends
    assert other.returncode == 2 and "--try-backend" in other.stderr
    for bad, says in (("no-such", "no-such"), ("onnxruntime:bogus=1", "bogus"),
                      ("cpu", "that is --backend"), ("cuda", "device")):
        refused = cli(*args, "--try-backend", bad, "--out", str(tmp_path / "u"), env=env)
        assert refused.returncode == 2 and says in refused.stderr, (bad, refused.stderr)
    recipe = tmp_path / "r.toml"
    recipe.write_text('baseline_backend = "onnxruntime"\n')
    refused = cli("tune", str(recipe), *args[1:-2], "--out", str(tmp_path / "r"), env=env)
    assert refused.returncode == 2 and "--try-backend NAME instead" in refused.stderr


def test_a_nan_cosine_is_not_within_a_cosine_budget() -> None:
    from types import SimpleNamespace

    from inferopt.plugins.commands.tune.search import Goal, record

    goal = Goal("latency", 0.01, False, "cosine")
    report = SimpleNamespace(
        optimized={"fidelity": {"cosine": float("nan")}}, baseline={}, steps=[], warnings=[],
        verdict={}, to_dict=dict, improvement=lambda *a: (1.5, "better"))
    rec = record(report, goal)
    assert rec["cosine_drop"] is None and not goal.within({**rec, "status": "ok"})


def test_min_cosine_is_the_budget_for_data_without_labels(cli: Any, tmp_path: Path) -> None:
    args = ["tune", "--model", "demo:digits-mlp-small", "--data", "synthetic:shape=64x64",
            "--metric", "latency:min_runs=5,min_seconds=0,warmup=1", "-t", "int8",
            "--trials", "2"]
    refused = cli(*args, "--out", str(tmp_path / "a"))
    assert refused.returncode == 2 and "--min-cosine 0.99" in refused.stderr
    both = cli(*args, "--min-cosine", "0.99", "--max-accuracy-drop", "1")
    assert both.returncode == 2 and "one quality budget" in both.stderr
    for objective, says in (("fidelity", "only be as close"), ("accuracy", "no labels")):
        bad = cli(*args, "--min-cosine", "0.99", "--objective", objective,
                  "--out", str(tmp_path / objective))
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
        assert not (tmp_path / objective / "study.db").exists()
    out = tmp_path / "c"
    result = cli(*args, "--min-cosine", "0.999", "--out", str(out), "--json")
    assert result.returncode in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    assert doc["settings"]["quality"] == "cosine" and "cosine to the baseline" in doc["goal"]
    int8 = next(t for t in doc["trials"] if t["key"] == "int8")
    # int8 keeps the outputs (cosine ~0.9999), so the trial is within the budget
    assert 0.0 <= int8["cosine_drop"] < 1e-3 and int8["within_budget"]
    assert "| cosine |" in (out / "tune.md").read_text()
    assert doc["settings"]["min_cosine"] == 0.999
    resumed = cli(*args, "--out", str(out))  # the default accuracy budget: no labels
    assert resumed.returncode == 2


def test_json_output_is_strict_json_as_tune_json_is(capsys: Any) -> None:
    from inferopt.plugins.commands.tune.results import show

    doc = {"settings": {"objective": "latency", "max_accuracy_drop": 1.0, "relative": False},
           "goal": "g", "trials": [], "pareto": [], "chosen": None, "closest": [],
           "baseline": {"latency_p50_ms": float("nan"), "a_a_speedup": float("inf")},
           "artifacts": {"study": "s", "study_name": "n", "summary": "tune.json"}}
    with pytest.raises(SystemExit):  # no candidate chosen: exit 1
        show(doc, as_json=True)
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert printed["baseline"] == {"latency_p50_ms": None, "a_a_speedup": None}


def test_out_never_takes_a_users_files_for_an_earlier_tune(cli: Any, tmp_path: Path) -> None:
    """A folder with a tune-like name in it is not an earlier tune (a user's best/ was deleted,
    a tune.md overwritten); tune's own names as links or of the wrong kind are refused (it
    wrote through a .tune.lock link), before anything is written."""
    import shutil

    args = ["tune", *FAST, "-t", "int8", "--trials", "1"]
    mine = tmp_path / "mine.txt"
    mine.write_text("user data")
    proj = tmp_path / "proj"
    (proj / "best").mkdir(parents=True)
    (proj / "best" / "model.pt").write_text("weights")
    (proj / "tune.md").write_text("my notes")
    for files in (["best", "tune.md"], ["tune.md"]):
        for name in {"best", "tune.md", "notes.txt"} - set(files):
            shutil.rmtree(proj / name) if (proj / name).is_dir() else \
                (proj / name).unlink(missing_ok=True)
        result = cli(*args, "--out", str(proj))
        assert result.returncode == 2 and "not an earlier tune" in result.stderr, result.stderr
    assert (proj / "tune.md").read_text() == "my notes" and sorted(
        p.name for p in proj.iterdir()) == ["tune.md"]
    in_file = cli(*args, "--out", str(mine / "sub"))
    assert in_file.returncode == 2 and "a parent of it is a file" in in_file.stderr
    done = tmp_path / "done"
    assert cli(*args, "--out", str(done)).returncode in (0, 1)
    for i, (name, make) in enumerate(((".tune.lock", lambda p: p.symlink_to(mine)),
                                      ("tune.json", lambda p: p.mkdir()),
                                      ("best", lambda p: p.symlink_to(tmp_path)),
                                      ("best", lambda p: p.mkdir()))):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(done, copy, symlinks=True)
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        make(path)
        for restart in ([], ["--restart"]):
            result = cli(*args, "--out", str(copy), *restart)
            assert result.returncode == 2 and f"{name} is " in result.stderr, result.stderr
            assert path.exists() or path.is_symlink()
    assert mine.read_text() == "user data" and (tmp_path / "proj").is_dir()


def test_restart_clears_what_a_killed_tune_left_and_waits_for_no_running_one(
        cli: Any, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "t"
    args = ["tune", *FAST, "-t", "int8", "--trials", "1", "--out", str(out)]
    assert cli(*args).returncode in (0, 1)
    (out / ".best.partial-x1").mkdir()  # a half-saved best, journals, a half-written summary
    (out / ".best.partial-x1" / "model.pt").write_text("half")
    for name in ("study.db-journal", ".tune.json.123.tmp"):
        (out / name).write_text("")
    assert cli(*args).returncode in (0, 1)  # a plain rerun continues beside them
    (out / "study.db-backup").write_text("a user's copy")  # not a leftover: refused, kept
    refused = cli(*args, "--restart")
    assert refused.returncode == 2 and "study.db-backup" in refused.stderr
    assert (out / "study.db-backup").read_text() == "a user's copy"
    (out / "study.db-backup").unlink()
    with (out / ".tune.running").open("a") as running:
        fcntl.flock(running, fcntl.LOCK_SH)  # a worker running in --out
        refused = cli(*args, "--restart")
        assert refused.returncode == 2 and "a tune is running" in refused.stderr
        assert (out / "study.db").is_file()
    import inferopt

    real = inferopt.Session.load_inputs

    def slow_load(self: Any, *a: Any, **k: Any) -> Any:
        (out / "notes.txt").write_text("written while the model loaded")
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as m:  # checked again before deleting: kept
        m.setattr(inferopt.Session, "load_inputs", slow_load)
        refused = cli(*args, "--restart")
    assert refused.returncode == 2 and "notes.txt" in refused.stderr
    (out / "notes.txt").unlink()
    again = cli(*args, "--restart", "--json")
    assert again.returncode in (0, 1), again.stderr
    assert not {"study.db-journal", ".tune.json.123.tmp", ".best.partial-x1"} & {
        p.name for p in out.iterdir()}
    assert len(json.loads(again.stdout)["trials"]) == 2  # A/A and int8: a new study


def test_storage_refusals_and_a_study_left_half_set_up(cli: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    import types

    import optuna

    from inferopt.plugins.commands.tune import search

    args = ["tune", *FAST, "-t", "int8", "--trials", "1"]
    for url in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        result = cli(*args, "--storage", url, "--out", str(tmp_path / "m"))
        assert result.returncode == 2 and "in-memory" in result.stderr, (url, result.stderr)
    other = f"sqlite:///{tmp_path / 'other.db'}"  # another program's study of the same name
    study = optuna.create_study(study_name="inferopt-tune", storage=other)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    def no_wait(_seconds: float) -> None:
        raise AssertionError("waited for another program's study to be set up")

    earlier = tmp_path / "o"  # an earlier tune in --out: a refused --restart keeps it
    assert cli(*args, "--out", str(earlier)).returncode in (0, 1)
    kept = sorted(p.name for p in earlier.iterdir())
    for restart in ([], ["--restart"]):
        with monkeypatch.context() as m:  # refused at once, not after SETUP_WAIT
            m.setattr(search, "time", types.SimpleNamespace(
                sleep=no_wait, monotonic=time.monotonic, time=time.time))
            result = cli(*args, "--storage", other, "--out", str(earlier), *restart)
        assert result.returncode == 2 and "not an inferopt tune study" in result.stderr
        assert sorted(p.name for p in earlier.iterdir()) == kept
    assert len(optuna.load_study(study_name="inferopt-tune", storage=other).trials) == 2
    # a worker killed while it set the study up: a rerun finishes the setup and goes on
    monkeypatch.setattr(search, "SETUP_WAIT", 0.3)
    for attrs in ({}, {"schema": search.SCHEMA}, {"schema": search.SCHEMA, "fingerprint": "x"},
                  {"fingerprint": "x"}):  # an earlier version set the fingerprint first
        out = tmp_path / f"half{len(attrs)}{'s' if 'schema' in attrs else ''}"
        out.mkdir()
        (out / ".tune.running").touch()
        half = optuna.create_study(study_name="inferopt-tune",
                                   storage=f"sqlite:///{out / 'study.db'}",
                                   directions=["maximize", "minimize", "minimize"])
        for key, value in attrs.items():
            half.set_user_attr(key, value)
        result = cli(*args, "--out", str(out), "--json")
        if "fingerprint" in attrs:  # another search's: refused, nothing of this one written
            assert result.returncode == 2 and "differing: fingerprint" in result.stderr
            assert half.user_attrs == attrs and not half.trials
            continue
        assert result.returncode in (0, 1) and "left half set up" in result.stderr, result.stderr
        assert len(json.loads(result.stdout)["trials"]) == 2
