"""``inferopt.testing``: pytest fixtures for plugin authors (and inferopt's own tests).

Installed with inferopt and loaded by pytest through the ``pytest11`` entry point, so a plugin's
test suite can use these fixtures without importing anything. Every name starts with
``inferopt_``:

* ``inferopt_plugins``: a fresh plugin manager with every installed plugin loaded, and
  ``inferopt_registry``: what they registered;
* ``inferopt_cli``: run the ``inferopt`` command in process, in a fresh working directory;
  returns ``returncode``, ``stdout``, ``stderr``;
* ``inferopt_tiny_model`` / ``inferopt_tiny_model_factory`` and ``inferopt_tiny_data``: a small
  seeded MLP and labelled data for it (``inferopt.Data``, with a calibration split);
* ``inferopt_roundtrip(name, model=None, data=None, **options)``: run one optimizer through the
  whole pipeline, save, rebuild with ``inferopt.load``, check the rebuilt model gives the same
  outputs as a fresh ``inferopt.apply``; returns ``(report, loaded_model)``;
* ``inferopt_backend_contract(backend)``: run a model through a backend's ``prepare``,
  ``forward``, ``run_all`` and ``time``, check the outputs match eager PyTorch;
* ``inferopt_metric_contract(metric)``: measure a model with a metric as the baseline and as
  the optimized model, check each result is a flat, JSON-able dict holding ``primary``.

``tiny_model``, ``tiny_model_factory`` and ``tiny_data`` are deprecated aliases of the
``inferopt_`` names. Importing this module does not import torch (the fixtures do, when used).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest


@attrs.frozen
class CliResult:
    """What an ``inferopt`` command run in process returned."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def _inferopt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inferopt-testing-cache")


@pytest.fixture
def inferopt_plugins() -> Any:
    """A fresh :class:`inferopt._manager.PluginManager` with all installed plugins loaded."""
    from inferopt._manager import PluginManager

    return PluginManager().load_entrypoints()


@pytest.fixture
def inferopt_registry(inferopt_plugins: Any) -> Any:
    """The :class:`inferopt._registry.Registry` built from ``inferopt_plugins``."""
    from inferopt._registry import Registry

    return Registry.from_manager(inferopt_plugins)


@pytest.fixture
def inferopt_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _inferopt_cache: Path
                 ) -> Callable[..., CliResult]:
    """``inferopt_cli(*args, env=None)`` runs ``inferopt ARGS`` in process in ``tmp_path``."""
    from click.testing import CliRunner

    from inferopt._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFEROPT_CACHE_DIR", os.environ.get("INFEROPT_CACHE_DIR",
                                                            str(_inferopt_cache)))

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        with monkeypatch.context() as m:
            for key, value in (env or {}).items():
                m.setenv(key, value)
            result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def _tiny_model() -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _tiny_data() -> Any:
    import torch

    import inferopt

    gen = torch.Generator().manual_seed(1)
    teacher = _tiny_model()

    def batches() -> list[Any]:
        out = []
        for _ in range(4):
            x = torch.randn(8, 16, generator=gen)
            with torch.no_grad():
                out.append(inferopt.Batch(x, teacher(x).argmax(-1)))
        return out

    return inferopt.Data(eval=batches(), calibration=batches(), description="tiny")


def _factory(model: Any, fixture: str) -> Callable[[], Any]:
    """A function giving a fresh copy of ``model`` on each call: ``model`` may be an
    ``nn.Module`` (deep-copied) or a function that builds one."""
    import torch

    if model is None:
        return _tiny_model
    if isinstance(model, torch.nn.Module):
        return lambda: copy.deepcopy(model)
    if callable(model):
        return model
    raise TypeError(f"{fixture}: model must be an nn.Module or a function returning one, "
                    f"got {type(model).__name__}")


def _data(data: Any, model: Any, fixture: str) -> Any:
    import inferopt

    if data is None:
        if model is not None:
            raise TypeError(f"{fixture}: with your own model, pass data=... too (an "
                            "inferopt.Data or a list of inferopt.Batch for that model)")
        return _tiny_data()
    if isinstance(data, inferopt.Data):
        return data
    return inferopt.Data(eval=list(data))


def _tensors(obj: Any) -> list[Any]:
    from inferopt.utils import iter_tensors, move_to

    return [t.float() for t in iter_tensors(move_to(obj, "cpu"))]


def _assert_close(actual: Any, expected: Any, atol: float, rtol: float, what: str) -> None:
    import torch

    got, want = _tensors(actual), _tensors(expected)
    assert len(got) == len(want), f"{what}: {len(got)} output tensors, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, f"{what}: output {i} has shape {tuple(a.shape)}, " \
                                   f"expected {tuple(b.shape)}"
        if not torch.allclose(a, b, atol=atol, rtol=rtol):
            worst = float((a - b).abs().max())
            raise AssertionError(f"{what}: output {i} differs by up to {worst:.3g} "
                                 f"(atol={atol}, rtol={rtol})")


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"the fixture {old!r} is deprecated; use {new!r} (inferopt.testing)",
                  DeprecationWarning, stacklevel=3)


@pytest.fixture
def inferopt_tiny_model_factory() -> Callable[[], Any]:
    """A function building the same seeded MLP (16 -> 32 -> 4) on every call."""
    return _tiny_model


@pytest.fixture
def inferopt_tiny_model() -> Any:
    """The seeded 16-32-4 MLP, in eval mode."""
    return _tiny_model()


@pytest.fixture
def inferopt_tiny_data() -> Any:
    """4 eval and 4 calibration batches of 8 samples, labelled by the tiny model itself (so
    accuracy starts at 100% and any drop is the optimization's)."""
    return _tiny_data()


@pytest.fixture
def tiny_model_factory() -> Callable[[], Any]:
    """Deprecated alias of ``inferopt_tiny_model_factory``."""
    _deprecated("tiny_model_factory", "inferopt_tiny_model_factory")
    return _tiny_model


@pytest.fixture
def tiny_model() -> Any:
    """Deprecated alias of ``inferopt_tiny_model``."""
    _deprecated("tiny_model", "inferopt_tiny_model")
    return _tiny_model()


@pytest.fixture
def tiny_data() -> Any:
    """Deprecated alias of ``inferopt_tiny_data``."""
    _deprecated("tiny_data", "inferopt_tiny_data")
    return _tiny_data()


@pytest.fixture
def inferopt_roundtrip(tmp_path: Path) -> Callable[..., tuple[Any, Any]]:
    """``inferopt_roundtrip(name, model=None, data=None, metrics=None, atol=1e-5, **options)``
    -> ``(report, loaded_model)``.

    Runs optimizer ``name`` with ``options`` through ``inferopt.run`` on ``model`` (an
    ``nn.Module``, copied before each use, or a function building one; default: the tiny MLP)
    and ``data`` (an ``inferopt.Data`` or a list of ``inferopt.Batch``; required with your own
    model), saves the run, rebuilds it with ``inferopt.load`` and checks that the rebuilt model
    gives the outputs of a fresh ``inferopt.apply`` on every eval batch.
    """
    counter = iter(range(1_000_000))

    def run(name: str, model: Any = None, data: Any = None, metrics: list[str] | None = None,
            atol: float = 1e-5, **options: Any) -> tuple[Any, Any]:
        import torch

        import inferopt
        from inferopt._recipe import Spec
        from inferopt.utils import call_model

        build = _factory(model, "inferopt_roundtrip")
        batches = _data(data, model, "inferopt_roundtrip")
        spec = str(Spec(name, dict(options)))
        out = tmp_path / f"roundtrip-{name}-{next(counter)}"
        report = inferopt.run(model=build(), data=batches, optimize=[spec],
                              metrics=metrics or ["fidelity", "size"], out=out)
        loaded = inferopt.load(out, model=build())
        again = inferopt.apply(build(), name, data=batches, **options)
        with torch.inference_mode():
            for i, batch in enumerate(batches.eval):
                _assert_close(call_model(loaded, batch.inputs), call_model(again, batch.inputs),
                              atol, 1e-5, f"{name}: eval batch {i}: the model rebuilt by "
                              "inferopt.load vs a fresh inferopt.apply")
        return report, loaded

    return run


class _EagerBackend:
    """Stands in for a backend when a metric is checked on its own: eager PyTorch on the CPU."""

    @staticmethod
    def make() -> Any:
        import inferopt

        class EagerCpu(inferopt.Backend):
            name = "inferopt-testing-eager"

            def prepare(self, model: Any, ctx: Any) -> Any:
                return model.to("cpu").eval()

        return EagerCpu()


def _prepare(backend: Any, model: Any, inputs: Any, role: str) -> Any:
    """``backend.prepare`` as a run calls it: with a PrepareContext (example inputs on the
    backend's device, the role), or the deprecated one-argument form."""
    import inferopt
    from inferopt._prepare import takes_context

    if not takes_context(backend):
        return backend.prepare(model)
    ctx = inferopt.PrepareContext(example_inputs=backend.to_device(inputs), role=role)
    return backend.prepare(model, ctx)


def _instance(obj: Any, kind: str, fixture: str) -> Any:
    """A plugin instance from an instance, a class (built with its default options) or a
    registered name."""
    if isinstance(obj, str):
        from inferopt._manager import PluginManager
        from inferopt._registry import Registry

        registry = Registry.from_manager(PluginManager().load_entrypoints())
        if obj not in registry.names(kind):
            raise LookupError(f"{fixture}: no {kind} named {obj!r} is installed; installed: "
                              + ", ".join(registry.names(kind)))
        obj = registry.get(kind, obj).obj
    return obj() if isinstance(obj, type) else obj


@attrs.frozen
class BackendContractResult:
    """What ``inferopt_backend_contract`` saw: the prepared model, the outputs of every eval
    batch (on the CPU), the seconds ``time`` measured for one batch and ``describe()``."""

    prepared: Any
    outputs: list[Any]
    seconds: float
    description: dict[str, Any]


@pytest.fixture
def inferopt_backend_contract() -> Callable[..., BackendContractResult]:
    """``inferopt_backend_contract(backend, model=None, data=None, atol=1e-4, rtol=1e-4)``.

    ``backend`` is a Backend class (built with its default options), an instance, or a
    registered name. Skips the test with the backend's reason when ``available()`` says it
    cannot run here. Otherwise prepares ``model`` (default: the tiny MLP; ``data`` is required
    with your own model), runs every eval batch through ``forward`` and ``run_all``, checks the
    outputs match eager PyTorch within the tolerances, times one batch with ``time`` (a positive,
    finite number of seconds) and checks ``describe()`` is a JSON-able dict naming the backend.
    """

    def check(backend: Any, model: Any = None, data: Any = None, atol: float = 1e-4,
              rtol: float = 1e-4) -> BackendContractResult:
        import torch

        from inferopt.utils import call_model

        instance = _instance(backend, "backend", "inferopt_backend_contract")
        name = getattr(instance, "name", None)
        assert isinstance(name, str) and name, f"{type(instance).__name__} has no name"
        reason = instance.available()
        if reason is not None:
            pytest.skip(f"backend {name!r} cannot run here: {reason}")
        build = _factory(model, "inferopt_backend_contract")
        batches = _data(data, model, "inferopt_backend_contract")
        if data is None:  # a real run's last batch is often smaller: a backend must take it
            import inferopt as _inferopt

            last = batches.eval[-1]
            batches = _inferopt.Data(
                eval=[*batches.eval, _inferopt.Batch(last.inputs[:5], last.labels[:5])],
                calibration=batches.calibration, description=batches.description)
        reference = build().eval()
        with torch.inference_mode():
            expected = [call_model(reference, b.inputs) for b in batches.eval]
        prepared = _prepare(instance, build(), batches.eval[0].inputs, "baseline")
        outputs = []
        for i, batch in enumerate(batches.eval):
            out = instance.forward(prepared, instance.to_device(batch.inputs))
            _assert_close(out, expected[i], atol, rtol,
                          f"backend {name!r}: forward on eval batch {i} vs eager PyTorch")
            outputs.append(out)
        for i, out in enumerate(instance.run_all(prepared, batches.eval)):
            _assert_close(out, expected[i], atol, rtol,
                          f"backend {name!r}: run_all, eval batch {i} vs eager PyTorch")
        inputs = instance.to_device(batches.eval[0].inputs)
        seconds = instance.time(lambda: instance.forward(prepared, inputs))
        assert isinstance(seconds, float) and math.isfinite(seconds) and seconds > 0, (
            f"backend {name!r}: time() returned {seconds!r}, not a positive number of seconds")
        description = instance.describe()
        assert isinstance(description, dict), f"backend {name!r}: describe() is not a dict"
        json.dumps(description)  # the report stores it
        assert description.get("backend") == name, (
            f"backend {name!r}: describe() should say {{'backend': {name!r}, ...}}")
        return BackendContractResult(prepared, [_cpu(o) for o in outputs], seconds, description)

    return check


def _cpu(obj: Any) -> Any:
    from inferopt.utils import move_to

    return move_to(obj, "cpu")


def _perturbed(model: Any) -> Any:
    """A copy of ``model`` with slightly changed weights: an "optimized" model whose outputs
    differ a little from the baseline's, as after quantization."""
    import torch

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.01 * p.abs().mean())
    return other


@pytest.fixture
def inferopt_metric_contract() -> Callable[..., dict[str, Any]]:
    """``inferopt_metric_contract(metric, model=None, data=None, optimized=None, backend=None)``
    -> ``{"baseline": result, "optimized": result}`` (plus ``"pair"``: ``measure_pair``'s
    ``(baseline, optimized, comparison)`` for paired metrics that measure pairs).

    ``metric`` is a Metric class (built with its default options), an instance, or a registered
    name. Measures ``model`` (default: the tiny MLP; ``data`` is required with your own model)
    as the baseline and ``optimized`` (default: a copy with slightly changed weights) as the
    optimized model, on ``backend`` (default: eager PyTorch on the CPU), with the context a run
    gives (role, the baseline's outputs, the saved weights), and checks that every result is a
    flat dict of JSON values (numbers, strings, booleans, None) holding the metric's
    ``primary`` field as a number.
    """

    def check(metric: Any, model: Any = None, data: Any = None, optimized: Any = None,
              backend: Any = None) -> dict[str, Any]:
        import inferopt
        from inferopt.utils import get_logger, weights_bytes

        instance = _instance(metric, "metric", "inferopt_metric_contract")
        name = getattr(instance, "name", None)
        assert isinstance(name, str) and name, f"{type(instance).__name__} has no name"
        build = _factory(model, "inferopt_metric_contract")
        batches = _data(data, model, "inferopt_metric_contract")
        runner = (_EagerBackend.make() if backend is None
                  else _instance(backend, "backend", "inferopt_metric_contract"))
        baseline_model = build()
        optimized_model = (_perturbed(baseline_model) if optimized is None
                           else _factory(optimized, "inferopt_metric_contract")())
        base_prepared = _prepare(runner, baseline_model, batches.eval[0].inputs, "baseline")
        baseline_outputs = runner.run_all(base_prepared, batches.eval)
        opt_prepared = _prepare(runner, optimized_model, batches.eval[0].inputs, "optimized")

        def context(role: str, model: Any) -> Any:
            return inferopt.MetricContext(
                log=get_logger(metric=name, role=role), role=role,
                baseline_outputs=baseline_outputs, saved_weights=lambda: weights_bytes(model))

        results: dict[str, Any] = {}
        for role, raw, prepared in (("baseline", baseline_model, base_prepared),
                                    ("optimized", optimized_model, opt_prepared)):
            result = instance.measure(prepared, runner, batches, context(role, raw))
            _check_result(result, instance, f"metric {name!r} measuring the {role} model")
            results[role] = result
        if instance.paired:
            pair = instance.measure_pair(base_prepared, opt_prepared, runner, batches,
                                         context("pair", optimized_model))
            if pair is not None:
                assert isinstance(pair, tuple) and len(pair) == 3, (
                    f"metric {name!r}: measure_pair should return (baseline, optimized, "
                    f"comparison), got {type(pair).__name__}")
                for role, result in zip(("baseline", "optimized"), pair[:2], strict=True):
                    _check_result(result, instance, f"metric {name!r}: measure_pair, {role}")
                assert isinstance(pair[2], dict) and "verdict" in pair[2], (
                    f"metric {name!r}: measure_pair's comparison needs a 'verdict'")
                results["pair"] = pair
        return results

    return check


def _check_result(result: Any, metric: Any, what: str) -> None:
    assert isinstance(result, dict), f"{what}: measure returned {type(result).__name__}, " \
                                     "not a dict"
    for key, value in result.items():
        assert isinstance(key, str), f"{what}: key {key!r} is not a string"
        assert value is None or isinstance(value, bool | int | float | str), (
            f"{what}: {key!r} is a {type(value).__name__}; results are flat: numbers, strings, "
            "booleans or None (put a tensor's value in with float(...))")
    json.dumps(result)
    if metric.primary:
        assert metric.primary in result, (
            f"{what}: the result has no {metric.primary!r} (the metric's primary field); "
            f"keys: {', '.join(result)}")
        value = result[metric.primary]
        assert isinstance(value, int | float) and not isinstance(value, bool), (
            f"{what}: primary field {metric.primary!r} is {value!r}, not a number")
