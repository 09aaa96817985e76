"""Lifecycle hooks and step checks, with plugins registered in code on a fresh manager."""

from __future__ import annotations

import types

import attrs
import pytest

import inferopt
from inferopt._manager import PluginManager
from inferopt._pipeline import run
from inferopt._recipe import make_recipe

FAST = ["accuracy", "fidelity", "latency:min_runs=3,min_seconds=0,warmup=0"]


def manager_with(*extra: tuple[str, object]) -> PluginManager:
    manager = PluginManager().load_entrypoints()
    for name, plugin in extra:
        manager.register(plugin, name=name)
    return manager


def recipe(**kw):
    return make_recipe(model="demo:digits-mlp-small", metrics=FAST, **kw)


def test_observers_see_run_start_each_step_and_run_end(tmp_path):
    seen = []
    observer = types.SimpleNamespace(
        inferopt_run_start=inferopt.hookimpl(lambda run: seen.append(("start", run.run_id))),
        inferopt_step_end=inferopt.hookimpl(lambda run, step: seen.append(("step", step.name))),
        inferopt_run_end=inferopt.hookimpl(
            lambda run, report: seen.append(("end", report.run_id))),
    )
    report = run(recipe(out=str(tmp_path / "o")), manager=manager_with(("observer", observer)))
    assert seen == [("start", report.run_id), ("step", "int8"), ("end", report.run_id)]


def test_an_observer_that_raises_does_not_stop_the_run(tmp_path):
    def boom(run):
        raise RuntimeError("observer bug")

    observer = types.SimpleNamespace(inferopt_run_start=inferopt.hookimpl(boom))
    report = run(recipe(), manager=manager_with(("bad", observer)), save=False)
    assert any("observer bug" in w for w in report.warnings)
    assert report.optimized["accuracy"]["top1"] > 0.9


@attrs.frozen
class Poison(inferopt.Optimizer):
    name = "poison"

    def apply(self, model, ctx):
        import torch

        with torch.no_grad():
            model[0].weight.fill_(float("nan"))
        return model


@attrs.frozen
class Reshape(inferopt.Optimizer):
    name = "reshape"

    def apply(self, model, ctx):
        import torch

        return torch.nn.Sequential(model, torch.nn.Flatten(0))


@attrs.frozen
class Crash(inferopt.Optimizer):
    name = "crash"

    def apply(self, model, ctx):
        raise KeyError("internal detail")


def optimizers(*classes):
    return types.SimpleNamespace(
        inferopt_register_optimizers=inferopt.hookimpl(
            lambda register: [register(c) for c in classes])
    )


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("poison", "step 1 'poison' made the model's outputs non-finite"),
        ("reshape", "step 1 'reshape' changed the model's output shapes"),
        ("crash", "step 1 'crash' (plugin 'test' from (registered in code)) failed: KeyError"),
    ],
)
def test_a_step_that_breaks_the_model_fails_clearly_and_saves_nothing(tmp_path, step, message):
    manager = manager_with(("test", optimizers(Poison, Reshape, Crash)))
    with pytest.raises(inferopt.StepFailed) as info:
        run(recipe(optimize=[step], out=str(tmp_path / "o")), manager=manager)
    assert message in str(info.value)
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial-*"))
