"""The demo source: trained weights ship with the package, so no user's machine (and no test
session) trains them; training stays for missing weights and for ``retrain=true``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from inferopt import SourceContext, UsageError
from inferopt.plugins.sources import demo
from inferopt.utils import get_logger
from tests.helpers import demo_correct

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[3]


def load(spec: str) -> object:
    return demo.DemoModels().load(spec, SourceContext(log=get_logger(), batch_size=64))


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo trained although its weights ship with the package")

    monkeypatch.setattr(demo, "train_classifier", refuse)


def test_trained_weights_ship_as_package_data():
    for name in demo.MODELS:
        assert demo.shipped_weights(name) is not None, f"{name}: run scripts/train_demo_weights.py"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    assert "demo_weights/*.safetensors" in package_data["inferopt.plugins.sources"]


def test_the_demo_loads_the_shipped_weights_without_training(no_training, tmp_path, monkeypatch):
    monkeypatch.setenv("INFEROPT_CACHE_DIR", str(tmp_path))
    model = load("demo:digits-mlp")
    # docs/performance.md and the README: 98.89% top-1 (355 of the 359 held-out digits)
    assert demo_correct(model) >= 354
    assert demo_correct(load("demo:digits-mlp-small")) >= 340
    assert not any(tmp_path.iterdir()), "nothing is trained, so nothing is cached"


def test_retrain_trains_with_the_recipe_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEROPT_CACHE_DIR", str(tmp_path))
    # one epoch instead of 60: the path is what is tested, not the recipe's accuracy
    monkeypatch.setitem(demo.MODELS, "digits-mlp-small", ((128,), 1, 1))
    shipped = load("demo:digits-mlp-small")
    retrained = load("demo:digits-mlp-small:retrain=true")
    again = load("demo:digits-mlp-small:retrain=true")
    assert (tmp_path / "digits-mlp-small-v1.safetensors").is_file()
    w = [dict(m.named_parameters())["0.weight"] for m in (shipped, retrained, again)]
    assert not w[0].allclose(w[1]), "retrain=true must not load the shipped weights"
    assert w[1].allclose(w[2]), "training is seeded: the same weights every time"


def test_without_shipped_weights_it_trains_once_then_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEROPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(demo.MODELS, "digits-mlp-small", ((128,), 1, 1))
    monkeypatch.setattr(demo, "shipped_weights", lambda name: None)
    first = load("demo:digits-mlp-small")
    assert (tmp_path / "digits-mlp-small-v1.safetensors").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("trained again although the cache has the weights")

    monkeypatch.setattr(demo, "train_classifier", refuse)
    second = load("demo:digits-mlp-small")
    assert dict(first.named_parameters())["0.weight"].allclose(
        dict(second.named_parameters())["0.weight"])


def test_bad_demo_options_are_usage_errors():
    with pytest.raises(UsageError, match="retrain"):
        load("demo:digits-mlp:retrain=maybe")
    with pytest.raises(UsageError, match="unknown demo model"):
        load("demo:digits-cnn")


def test_a_truncated_cache_is_trained_again_not_a_broken_demo(tmp_path, monkeypatch):
    """A copy or a run killed while writing the cache left half a file: the next load trains
    again instead of failing every demo run from then on."""
    monkeypatch.setenv("INFEROPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(demo.MODELS, "digits-mlp-small", ((128,), 1, 1))
    monkeypatch.setattr(demo, "shipped_weights", lambda name: None)
    load("demo:digits-mlp-small")
    cached = tmp_path / "digits-mlp-small-v1.safetensors"
    cached.write_bytes(cached.read_bytes()[:100])
    model = load("demo:digits-mlp-small")
    assert dict(model.named_parameters())["0.weight"].shape == (128, 64)
    assert cached.stat().st_size > 1000  # and the cache is whole again


def test_damaged_shipped_weights_say_how_to_recover(tmp_path, monkeypatch):
    broken = tmp_path / "shipped.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    monkeypatch.setattr(demo, "shipped_weights", lambda name: broken)
    with pytest.raises(UsageError, match="reinstall inferopt"):
        load("demo:digits-mlp-small")
