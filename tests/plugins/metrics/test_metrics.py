"""Built-in metrics measure what they say."""

from __future__ import annotations

import torch

import inferopt
from inferopt._contract import MetricContext
from inferopt._logging import get_logger
from inferopt.plugins.backends.cpu import CpuBackend
from inferopt.plugins.metrics.accuracy import AccuracyMetric
from inferopt.plugins.metrics.fidelity import FidelityMetric
from inferopt.plugins.metrics.latency import LatencyMetric
from inferopt.plugins.metrics.size import SizeMetric
from inferopt.plugins.metrics.throughput import ThroughputMetric


def ctx(**kw):
    return MetricContext(log=get_logger(), role="baseline", **kw)


class Fixed(torch.nn.Module):
    """Returns fixed logits: predicts class 0 for every sample."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3)
        out[:, 0] = 1.0
        return out


def data(labels):
    x = torch.zeros(len(labels), 4)
    return inferopt.Data(eval=[inferopt.Batch(x, torch.tensor(labels))])


def test_accuracy_counts_top1_and_ignores_minus_100():
    result = AccuracyMetric().measure(Fixed(), CpuBackend(), data([0, 0, 1, 2, -100]), ctx())
    assert result == {"top1": 0.5, "correct": 2, "samples": 4}


def test_fidelity_is_perfect_against_itself_and_drops_when_outputs_differ():
    model = torch.nn.Linear(4, 3)
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(8, 4))])
    ref = [model(b.inputs).detach() for b in d.eval]
    same = FidelityMetric().measure(model, CpuBackend(), d, ctx(baseline_outputs=ref))
    assert same["cosine"] > 0.9999 and same["max_abs_err"] < 1e-6 and same["agreement"] == 1
    flipped = FidelityMetric().measure(
        model, CpuBackend(), d, ctx(baseline_outputs=[-r for r in ref]))
    assert flipped["cosine"] < -0.9999 and flipped["agreement"] < 1
    # rows that are all zero in both (a ReLU output) agree fully: cosine 1, not 0
    relu = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    with torch.no_grad():
        relu[0].bias.fill_(-100.0)
    zeros = FidelityMetric().measure(relu, CpuBackend(), d,
                                     ctx(baseline_outputs=[torch.zeros(8, 3)]))
    assert zeros["cosine"] == 1.0


def test_latency_runs_until_count_and_reports_percentiles():
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(4, 8))])
    result = LatencyMetric(warmup=1, min_runs=10, min_seconds=0).measure(
        torch.nn.Linear(8, 8), CpuBackend(), d, ctx())
    assert result["runs"] == 10 and result["batch_size"] == 4
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    assert result["p99_ms"] <= result["max_ms"]


def test_throughput_counts_every_sample_of_every_pass():
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(4, 8)), inferopt.Batch(torch.randn(3, 8))])
    result = ThroughputMetric(min_passes=3, min_seconds=0).measure(
        torch.nn.Linear(8, 8), CpuBackend(), d, ctx())
    assert result["samples"] == 21
    assert result["samples_per_s"] == result["samples"] / result["seconds"]


def test_size_is_the_saved_file_size(tmp_path):
    from inferopt._artifacts import save_model, weights_bytes

    model = torch.nn.Linear(100, 50)
    result = SizeMetric().measure(model, CpuBackend(), None,
                                  ctx(saved_weights=lambda: weights_bytes(model)))
    save_model(model, tmp_path / "m.safetensors")
    on_disk = (tmp_path / "m.safetensors").stat().st_size
    assert abs(result["bytes"] - on_disk) < 200  # same tensors; only the header metadata differs
    assert result["elements"] == 5050 and result["bytes_float32"] == 5050 * 4


class Indices(torch.nn.Module):
    """Returns class indices, not logits."""

    def forward(self, x):
        return x.sum(-1).long().clamp(0, 2)


def test_models_returning_class_indices_are_measured_sensibly():
    d = inferopt.Data(eval=[inferopt.Batch(torch.tensor([[0.0], [1.0], [2.0], [1.0]]),
                                           torch.tensor([0, 1, 1, 1]))])
    ref = [Indices()(b.inputs) for b in d.eval]
    fid = FidelityMetric().measure(Indices(), CpuBackend(), d, ctx(baseline_outputs=ref))
    assert fid["cosine"] > 0.9999 and fid["agreement"] == 1.0
    acc = AccuracyMetric().measure(Indices(), CpuBackend(), d, ctx())
    assert acc["top1"] == 0.75


def test_accuracy_on_one_value_per_sample_is_a_clear_error():
    import pytest

    d = data([0, 1])
    with pytest.raises(inferopt.UsageError, match="accuracy needs class logits"):
        AccuracyMetric().measure(torch.nn.Sequential(torch.nn.Flatten(0)), CpuBackend(), d,
                                 ctx())
