"""``inferopt.load`` on a saved run that someone else may have edited: nothing named in the run
directory executes code without ``trust_model=True``, its files stay inside it, its weights
must fit the rebuilt model exactly, and every malformed manifest is a UsageError naming the
file and the field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import inferopt
from inferopt import UsageError

MANIFEST = "inferopt.json"
WEIGHTS = "model.safetensors"

#: a "model" file whose import alone leaves a marker: proof that code ran
EVIL_PY = """\
from pathlib import Path

Path({marker!r}).write_text("imported")


def build():
    Path({marker!r}).write_text("called")
    import torch
    return torch.nn.Sequential(torch.nn.Linear(64, 10))
"""


# --- saved runs, made once per module and copied per test --------------------------------------


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real saved runs of the small demo: int8 (the default step) and none (no step)."""
    root = tmp_path_factory.mktemp("saved-runs")
    inferopt.run(model="demo:digits-mlp-small", out=root / "int8", metrics=["size"])
    inferopt.run(model="demo:digits-mlp-small", out=root / "plain", optimize=[],
                 metrics=["size"])
    return {"int8": root / "int8", "plain": root / "plain"}


def copy_run(saved_runs: dict[str, Path], kind: str, dest: Path) -> Path:
    run = dest / f"run-{kind}"
    shutil.copytree(saved_runs[kind], run)
    return run


def edit_manifest(run: Path, **changes: Any) -> dict[str, Any]:
    doc = json.loads((run / MANIFEST).read_text())
    doc.update(changes)
    (run / MANIFEST).write_text(json.dumps(doc))
    return doc


def evil_file(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "evil.py"
    path.write_text(EVIL_PY.format(marker=str(marker)))
    return path


# --- 1. specs from the manifest that would run code --------------------------------------------


def test_a_python_module_spec_in_the_manifest_runs_nothing(saved_runs, tmp_path):
    run = copy_run(saved_runs, "plain", tmp_path)
    marker = tmp_path / "pwned"
    edit_manifest(run, model=f"python:os:system:command='touch {marker}'")
    with pytest.raises(UsageError) as info:
        inferopt.load(run)
    message = str(info.value)
    assert str(run / MANIFEST) in message and "'model'" in message
    assert "trust_model=True" in message and "even one you wrote yourself" in message
    assert not marker.exists()


@pytest.mark.parametrize("relative", [True, False])
def test_a_python_file_spec_outside_the_run_runs_nothing(saved_runs, tmp_path, relative):
    run = copy_run(saved_runs, "plain", tmp_path)
    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "elsewhere", marker)
    spec = (f"{run}/../../{tmp_path.name}/elsewhere/evil.py:build" if relative
            else f"{evil}:build")
    edit_manifest(run, model=spec)
    with pytest.raises(UsageError, match="trust_model=True"):
        inferopt.load(run)
    assert not marker.exists()


def test_a_distill_student_spec_in_the_manifest_runs_nothing(saved_runs, tmp_path):
    run = copy_run(saved_runs, "plain", tmp_path)
    marker = tmp_path / "pwned"
    evil = evil_file(tmp_path / "elsewhere", marker)
    edit_manifest(run, steps=[{"name": "distill", "options": {"student": f"{evil}:build"},
                               "state": {}}])
    with pytest.raises(UsageError) as info:
        inferopt.load(run)
    message = str(info.value)
    assert str(run / MANIFEST) in message and "'distill'" in message
    assert "option 'student'" in message and "trust_model=True" in message
    assert not marker.exists()


def test_a_data_only_student_spec_still_loads(saved_runs, tmp_path):
    """demo: builds the student from inferopt's own code: no trust needed."""
    run = copy_run(saved_runs, "plain", tmp_path)
    edit_manifest(run, steps=[{"name": "distill",
                               "options": {"student": "demo:digits-mlp-small"}, "state": {}}])
    loaded = inferopt.load(run)
    assert loaded[0].out_features == 128


def test_trust_model_lets_the_users_own_code_build_the_model(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text(
        "import torch\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(32, 8))\n")
    monkeypatch.chdir(tmp_path)
    inferopt.run(model="m.py:build", data="synthetic:shape=4x32", out="r", metrics=["size"])
    with pytest.raises(UsageError, match="trust_model=True"):
        inferopt.load(tmp_path / "r")
    assert type(inferopt.load(tmp_path / "r", trust_model=True)[0]).__name__ == "Int8Linear"


def test_a_third_party_source_is_code_unless_it_says_otherwise(saved_runs, tmp_path,
                                                               monkeypatch):
    from tests.helpers import make_plugin_dist

    marker = tmp_path / "pwned"
    source = f"""
        import inferopt
        from pathlib import Path


        class Mine(inferopt.ModelSource):
            scheme = "mine"

            def load(self, spec, ctx):
                Path({str(marker)!r}).write_text("called")
                from inferopt.plugins.sources.demo import build_mlp
                return build_mlp((128,))


        class MineData(Mine):
            scheme = "minedata"
            runs_code = False


        @inferopt.hookimpl
        def inferopt_register_models(register):
            register(Mine)
            register(MineData)
        """
    root = make_plugin_dist(tmp_path / "site", "inferopt-mine", "1.0",
                            {"mine": "inferopt_mine"}, {"inferopt_mine": source})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(__import__("sys").modules, "inferopt_mine", raising=False)
    run = copy_run(saved_runs, "plain", tmp_path)
    edit_manifest(run, model="mine:x")
    with pytest.raises(UsageError, match=r"model source 'mine'.*trust_model=True"):
        inferopt.load(run)
    assert not marker.exists()
    edit_manifest(run, model="minedata:x")  # declared data-only: loads
    assert isinstance(inferopt.load(run), torch.nn.Module)
    assert marker.exists()


def test_which_sources_are_data_only():
    from inferopt._registry import load_plugins

    _manager, registry = load_plugins()
    runs_code = {e.name: e.obj.runs_code for e in registry.entries("model source")}
    assert runs_code["python"] and runs_code["torch"]
    assert not runs_code["demo"] and not runs_code["hf"] and not runs_code["export"]


def test_hf_source_never_trusts_remote_code(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from inferopt import SourceContext
    from inferopt.plugins.sources.hf import HuggingFaceModels
    from inferopt.utils import get_logger

    seen: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("trust_remote_code", "not given"))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UsageError):
        HuggingFaceModels().load(f"hf:{tmp_path / 'ckpt'}", SourceContext(log=get_logger()))
    assert seen == [False]


# --- 2. files confined to the run directory ----------------------------------------------------


@pytest.mark.parametrize("name", [WEIGHTS, MANIFEST])
def test_a_file_linked_from_outside_the_run_is_refused(saved_runs, tmp_path, name):
    run = copy_run(saved_runs, "int8", tmp_path)
    outside = tmp_path / f"outside-{name}"
    shutil.move(run / name, outside)
    os.symlink(outside, run / name)
    with pytest.raises(UsageError, match=f"{name}.*outside the run directory"):
        inferopt.load(run)


def test_a_link_inside_the_run_is_fine(saved_runs, tmp_path):
    run = copy_run(saved_runs, "int8", tmp_path)
    shutil.move(run / WEIGHTS, run / "weights-copy.safetensors")
    os.symlink("weights-copy.safetensors", run / WEIGHTS)
    assert type(inferopt.load(run)[0]).__name__ == "Int8Linear"


def test_weights_that_are_a_directory_are_refused(saved_runs, tmp_path):
    run = copy_run(saved_runs, "int8", tmp_path)
    (run / WEIGHTS).unlink()
    (run / WEIGHTS).mkdir()
    with pytest.raises(UsageError, match="not a regular file"):
        inferopt.load(run)


def test_weights_that_are_not_safetensors_are_a_usage_error(saved_runs, tmp_path):
    run = copy_run(saved_runs, "int8", tmp_path)
    (run / WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        inferopt.load(run)


# --- 3. saved tensors must have the rebuilt model's dtype and shape ----------------------------


def test_a_weight_of_the_wrong_dtype_is_refused_not_cast(saved_runs, tmp_path):
    run = copy_run(saved_runs, "int8", tmp_path)
    state = load_file(str(run / WEIGHTS))
    assert state["0.weight_int8"].dtype == torch.int8
    state["0.weight_int8"] = torch.full(state["0.weight_int8"].shape, 300.0)  # int8: 44
    save_file(state, str(run / WEIGHTS))
    with pytest.raises(UsageError) as info:
        inferopt.load(run)
    message = str(info.value)
    assert "'0.weight_int8'" in message
    assert "torch.float32 (128, 64)" in message and "torch.int8 (128, 64)" in message


def test_a_weight_of_the_wrong_shape_is_a_usage_error(saved_runs, tmp_path):
    run = copy_run(saved_runs, "plain", tmp_path)
    state = load_file(str(run / WEIGHTS))
    state["0.weight"] = torch.zeros(3, 64)
    save_file(state, str(run / WEIGHTS))
    with pytest.raises(UsageError, match=r"'0.weight'.*\(3, 64\).*\(128, 64\)"):
        inferopt.load(run)


# --- 4. malformed manifests --------------------------------------------------------------------


def prune_step(structure: Any) -> dict[str, Any]:
    return {"name": "prune-l1", "options": {"structured": True, "sparsity": 0.5},
            "state": {"structure": structure}}


BAD_MANIFESTS: dict[str, tuple[Any, str]] = {
    # id: (document, or a function of the good one, or raw text; what the message names)
    "not-json": ("{ this is not json", "not a readable JSON manifest"),
    "not-utf8": (b"\xff\xfe\x00garbage", "not a readable JSON manifest"),
    "a-list": ([1, 2], "must be a JSON object"),
    "no-format": (lambda d: d.pop("format"), "'format' is missing"),
    "wrong-format": (lambda d: d.update(format="other/1"), "unknown format"),
    "no-model": (lambda d: d.pop("model"), "'model' is missing"),
    "model-not-str": (lambda d: d.update(model=["demo:digits-mlp-small"]), "'model' must be"),
    "no-steps": (lambda d: d.pop("steps"), "'steps' is missing"),
    "steps-not-list": (lambda d: d.update(steps={"name": "int8"}), "'steps' must be a list"),
    "step-not-object": (lambda d: d.update(steps=["int8"]), r"'steps\[0\]' must be an object"),
    "step-no-name": (lambda d: d["steps"][0].pop("name"), r"'steps\[0\].name' is missing"),
    "step-name-not-str": (lambda d: d["steps"][0].update(name=8),
                          r"'steps\[0\].name' must be"),
    "options-not-object": (lambda d: d["steps"][0].update(options=["mode=dynamic"]),
                           r"'steps\[0\].options' must be an object"),
    "state-not-object": (lambda d: d["steps"][0].update(state="x"),
                         r"'steps\[0\].state' must be an object"),
    "seed-not-int": (lambda d: d.update(seed="0"), "'seed' must be an integer"),
    "seed-bool": (lambda d: d.update(seed=True), "'seed' must be an integer"),
    "batch-size-float": (lambda d: d.update(batch_size=1.5), "'batch_size' must be an integer"),
    "unknown-step": (lambda d: d["steps"][0].update(name="nope"), r"steps\[0\] \('nope'\)"),
    "bad-option-value": (lambda d: d["steps"][0]["options"].update(mode={"x": 1}),
                         r"steps\[0\] \('int8'\) options"),
    "int8-layers-not-object": (lambda d: d["steps"][0]["state"].update(layers=[1]),
                               "saved state 'layers' must be an object"),
    "int8-qmax-str": (lambda d: d["steps"][0]["state"]["layers"]["0"].update(qmax="127"),
                      r"qmax must be an integer from 1 to 127"),
    "int8-qmax-zero": (lambda d: d["steps"][0]["state"]["layers"]["0"].update(qmax=0),
                       r"qmax must be an integer from 1 to 127"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_malformed_manifest_is_a_usage_error_naming_file_and_field(saved_runs, tmp_path, case):
    run = copy_run(saved_runs, "int8", tmp_path)
    change, expected = BAD_MANIFESTS[case]
    if isinstance(change, bytes):
        (run / MANIFEST).write_bytes(change)
    elif isinstance(change, str):
        (run / MANIFEST).write_text(change)
    elif callable(change):
        doc = json.loads((run / MANIFEST).read_text())
        change(doc)
        (run / MANIFEST).write_text(json.dumps(doc))
    else:
        (run / MANIFEST).write_text(json.dumps(change))
    with pytest.raises(UsageError, match=expected) as info:
        inferopt.load(run)
    assert str(run / MANIFEST) in str(info.value) or str(run.resolve() / MANIFEST) in str(
        info.value)


GOOD_LAYER = {"tensors": {"weight": [64, 64], "bias": [64]},
              "sizes": {"in_features": 64, "out_features": 64}}

BAD_STRUCTURES: dict[str, tuple[Any, str]] = {
    "not-object": ([GOOD_LAYER], "'structure': must be an object"),
    "float-shape": ({"0": {**GOOD_LAYER, "tensors": {"weight": [64.5, 64]}}},
                    r"tensors\['weight'\]: must be a list of 2 integers"),
    "string-size": ({"0": {**GOOD_LAYER, "sizes": {"out_features": "64"}}},
                    r"sizes\['out_features'\]: must be an integer"),
    "float-size": ({"0": {**GOOD_LAYER, "sizes": {"out_features": 12.5}}},
                   r"sizes\['out_features'\]: must be an integer"),
    "negative-size": ({"0": {**GOOD_LAYER, "tensors": {"weight": [-1, 64]}}},
                      "integers >= 0"),
    "huge-shape": ({"0": {**GOOD_LAYER, "tensors": {"weight": [10**12, 64]}}},
                   "larger than the layer's"),
    "wrong-rank": ({"0": {**GOOD_LAYER, "tensors": {"weight": [64]}}},
                   "must be a list of 2 integers"),
    "not-a-slot": ({"0": {**GOOD_LAYER, "tensors": {"forward": [1]}}},
                   "has no parameter or buffer 'forward'"),
    "not-a-size-attr": ({"0": {**GOOD_LAYER, "sizes": {"training": 0}}},
                        r"sizes\['training'\]: not a size attribute"),
    "missing-parts": ({"0": {"tensors": {}}}, "must be an object with 'tensors' and 'sizes'"),
    "unknown-layer": ({"9": GOOD_LAYER}, "refers to layer '9'"),
}


@pytest.mark.parametrize("case", list(BAD_STRUCTURES))
def test_a_saved_pruning_structure_with_bad_sizes_is_refused_at_load(saved_runs, tmp_path, case):
    run = copy_run(saved_runs, "plain", tmp_path)
    structure, expected = BAD_STRUCTURES[case]
    edit_manifest(run, steps=[prune_step(structure)])
    with pytest.raises(UsageError, match=expected) as info:
        inferopt.load(run)
    assert "'prune-l1'" in str(info.value)


def test_a_plausible_pruning_structure_still_restores(saved_runs, tmp_path):
    """The checks accept what pruning writes: the layer rebuilt at the saved (smaller) shape
    (the weights of the unpruned run then do not fit it, which load reports as such)."""
    run = copy_run(saved_runs, "plain", tmp_path)
    edit_manifest(run, steps=[prune_step({"0": GOOD_LAYER})])
    with pytest.raises(UsageError, match=r"saved as torch.float32 \(128.*holds torch.float32 \(64"):
        inferopt.load(run)
