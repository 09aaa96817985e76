"""inferopt.testing, the pytest plugin for plugin authors: its fixtures on other models and
data, the backend and metric contracts (passing on the built-ins, failing with a message that
says what is wrong on broken plugins), and the deprecated fixture names."""

from __future__ import annotations

import pytest
import torch

import inferopt
from inferopt.plugins.backends.cpu import CpuBackend

pytest_plugins = ["pytester"]


def wide_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(8, 48), torch.nn.ReLU(), torch.nn.Linear(48, 48),
                               torch.nn.ReLU(), torch.nn.Linear(48, 3)).eval()


def wide_data() -> list[inferopt.Batch]:
    gen = torch.Generator().manual_seed(4)
    return [inferopt.Batch(torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,),
                                                                            generator=gen))
            for _ in range(3)]


def test_roundtrip_takes_any_model_and_data(inferopt_roundtrip):
    report, loaded = inferopt_roundtrip("int8", model=wide_model, data=wide_data(),
                                        metrics=["size", "accuracy"])
    assert [s.name for s in report.steps] == ["int8"]
    assert report.optimized["size"]["bytes"] < 0.5 * report.baseline["size"]["bytes"]
    assert loaded(torch.randn(2, 8)).shape == (2, 3)


def test_roundtrip_leaves_a_module_it_is_given_untouched(inferopt_roundtrip):
    model = wide_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report, _loaded = inferopt_roundtrip("prune-l1", model=model, data=wide_data(), sparsity=0.5)
    assert report.steps[0].name == "prune-l1"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_roundtrip_with_a_model_but_no_data_says_what_to_pass(inferopt_roundtrip):
    with pytest.raises(TypeError, match="pass data="):
        inferopt_roundtrip("int8", model=wide_model)


@pytest.mark.parametrize("backend", [CpuBackend, CpuBackend(threads=1), "cpu"])
def test_builtin_cpu_backend_keeps_the_contract(inferopt_backend_contract, backend):
    result = inferopt_backend_contract(backend)
    # the 4 tiny batches plus a short last one (5 rows), as a real run often has
    assert len(result.outputs) == 5 and result.outputs[-1].shape[0] == 5 and result.seconds > 0
    assert result.description["backend"] == "cpu"


def test_backend_contract_on_another_model(inferopt_backend_contract):
    result = inferopt_backend_contract("cpu", model=wide_model(), data=wide_data())
    assert [tuple(o.shape) for o in result.outputs] == [(16, 3)] * 3


def test_backend_contract_skips_a_backend_that_cannot_run_here(pytester):
    pytester.makepyfile("""
        import inferopt

        class Elsewhere(inferopt.Backend):
            name = "elsewhere"
            def available(self):
                return "needs a machine we do not have"
            def prepare(self, model):
                return model

        def test_it(inferopt_backend_contract):
            inferopt_backend_contract(Elsewhere)
    """)
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*backend 'elsewhere' cannot run here: needs a machine*"])


@pytest.mark.parametrize("metric", ["size", "fidelity", "accuracy", "compute", "memory",
                                    "throughput"])
def test_builtin_metrics_keep_the_contract(inferopt_metric_contract, metric):
    results = inferopt_metric_contract(metric)
    assert set(results) >= {"baseline", "optimized"}


def test_metric_contract_sees_the_optimized_model(inferopt_metric_contract):
    results = inferopt_metric_contract("fidelity")
    assert results["baseline"]["cosine"] > 0.9999
    # the optimized model is a copy with slightly changed weights, so it differs a little
    assert results["optimized"]["cosine"] < results["baseline"]["cosine"]


BROKEN = """
    import attrs
    import torch
    import inferopt

    class OffByOne(inferopt.Backend):
        name = "off-by-one"
        def prepare(self, model):
            return model
        def forward(self, prepared, inputs):
            with torch.inference_mode():
                return prepared(inputs) + 1

    @attrs.frozen
    class Nested(inferopt.Metric):
        name = "nested"
        primary = "value"
        def measure(self, model, backend, data, ctx):
            return {"value": 1.0, "per_layer": {"0": 1.0}}

    @attrs.frozen
    class NoPrimary(inferopt.Metric):
        name = "no-primary"
        primary = "value"
        def measure(self, model, backend, data, ctx):
            return {"other": 1.0}

    @attrs.frozen
    class TensorValue(inferopt.Metric):
        name = "tensor-value"
        primary = "value"
        def measure(self, model, backend, data, ctx):
            return {"value": torch.tensor(1.0)}

    def test_backend(inferopt_backend_contract):
        inferopt_backend_contract(OffByOne)

    def test_nested(inferopt_metric_contract):
        inferopt_metric_contract(Nested)

    def test_no_primary(inferopt_metric_contract):
        inferopt_metric_contract(NoPrimary)

    def test_tensor_value(inferopt_metric_contract):
        inferopt_metric_contract(TensorValue)
"""


def test_contracts_fail_broken_plugins_with_what_is_wrong(pytester):
    pytester.makepyfile(BROKEN)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines_random([
        "*backend 'off-by-one': forward on eval batch 0 vs eager PyTorch: output 0 differs by up "
        "to 1*",
        "*metric 'nested' measuring the baseline model: 'per_layer' is a dict; results are flat*",
        "*metric 'no-primary' measuring the baseline model: the result has no 'value'*",
        "*metric 'tensor-value' measuring the baseline model: 'value' is a Tensor*",
    ])


def test_old_fixture_names_still_work_and_say_they_are_deprecated(pytester):
    pytester.makepyfile("""
        def test_old(tiny_model, tiny_data, tiny_model_factory, inferopt_tiny_model):
            x = tiny_data.eval[0].inputs
            assert tiny_model(x).allclose(inferopt_tiny_model(x))
            assert tiny_model_factory()(x).allclose(tiny_model(x))
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*the fixture 'tiny_model' is deprecated; use "
                                 "'inferopt_tiny_model'*"])
