"""Recipes from TOML and flags; flags win."""

from __future__ import annotations

import pytest

from inferopt import UsageError
from inferopt._recipe import Gates, Spec, make_recipe, parse_spec

TOML = """
model = "demo:digits-mlp-small"
data = "demo:digits"
backend = { name = "cpu", threads = 1 }
metrics = ["accuracy", "size"]
batch_size = 32
seed = 3

[[optimize]]
name = "int8"
skip = ["0", "2"]

[gates]
max_accuracy_drop = 1.5
"""


def test_parse_spec():
    assert parse_spec("int8:mode=dynamic,skip=a|b", "--optimize") == Spec(
        "int8", {"mode": "dynamic", "skip": "a|b"}
    )
    with pytest.raises(UsageError, match="'mode' is not key=value"):
        parse_spec("int8:mode", "--optimize")


def test_toml_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(TOML)
    r = make_recipe(path)
    assert r.model == "demo:digits-mlp-small"
    assert r.backend == Spec("cpu", {"threads": 1})
    assert r.optimize == (Spec("int8", {"skip": ["0", "2"]}),)
    assert [m.name for m in r.metrics] == ["accuracy", "size"] and r.metrics_explicit
    assert (r.batch_size, r.seed) == (32, 3)
    assert r.gates == Gates(max_accuracy_drop=1.5)


def test_flags_override_toml_field_by_field(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(TOML)
    r = make_recipe(path, optimize=["none"], batch_size=8, gates={"min_speedup": 1.1})
    assert r.optimize == ()
    assert r.batch_size == 8
    assert r.model == "demo:digits-mlp-small"  # not overridden
    assert r.gates == Gates(max_accuracy_drop=1.5, min_speedup=1.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('modle = "x"', "unknown key(s) modle; allowed: allow_collapse, backend, "
                        "baseline_backend, batch_size, data"),
        ("batch_size = \"big\"", "'batch_size' must be an integer, got 'big'"),
        ("optimize = \"int8\"", "'optimize' must be an array"),
        ("[[optimize]]\nmode = 'x'", "a table needs a 'name' key"),
        # gate names are checked against the installed metrics' gates at resolve time
        ("[gates]\nmax_acc = 'x'", "gates.max_acc must be a number"),
        ("model = ", "is not valid TOML"),
    ],
)
def test_bad_toml_is_an_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        make_recipe(path)
    assert message in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        make_recipe(tmp_path / "nope.toml")


def test_non_finite_gates_are_rejected():
    with pytest.raises(UsageError, match="gate min_speedup got nan"):
        make_recipe(gates={"min_speedup": float("nan")})


def test_baseline_backend_from_toml_and_flag(tmp_path):
    from inferopt._recipe import Spec, make_recipe

    path = tmp_path / "r.toml"
    path.write_text('backend = "onnxruntime"\nbaseline_backend = { name = "cpu", threads = 1 }\n')
    rec = make_recipe(path)
    assert rec.baseline_backend == Spec("cpu", {"threads": 1})
    assert rec.to_dict()["baseline_backend"] == str(Spec("cpu", {"threads": 1}))
    assert make_recipe(path, baseline_backend="inductor").baseline_backend == Spec("inductor")
    assert make_recipe().to_dict()["baseline_backend"] is None
