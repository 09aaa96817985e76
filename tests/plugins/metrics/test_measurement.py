"""Measurements a user bets on: speedups with confidence intervals, tail percentiles with
enough samples, memory, MACs, top-5, SNR, throughput at several batch sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import inferopt
from inferopt._contract import MetricContext
from inferopt._logging import get_logger
from inferopt.plugins.backends.cpu import CpuBackend
from inferopt.plugins.metrics.accuracy import AccuracyMetric
from inferopt.plugins.metrics.compute import ComputeMetric
from inferopt.plugins.metrics.fidelity import FidelityMetric
from inferopt.plugins.metrics.latency import LatencyMetric
from inferopt.plugins.metrics.memory import MemoryMetric
from inferopt.plugins.metrics.throughput import ThroughputMetric
from inferopt.plugins.metrics.timing_stats import percentiles_ms, speed_verdict, speedup_ci


def ctx(**kw):
    return MetricContext(log=get_logger(), role="baseline", **kw)


def _noisy(center: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return center * (1 + 0.05 * rng.standard_normal(n)) + 0.02 * center * rng.exponential(1, n)


def test_same_distribution_is_no_measurable_change_and_a_real_speedup_is_faster():
    a, b = _noisy(1e-3, 200, 1), _noisy(1e-3, 200, 2)
    speedup, low, high = speedup_ci(a, b)
    assert low < 1 < high
    assert speed_verdict(speedup, low, high, 0.02) == "no measurable change"
    fast = _noisy(0.5e-3, 200, 3)
    speedup, low, high = speedup_ci(a, fast)
    assert 1.8 < low <= speedup <= high < 2.2
    assert speed_verdict(speedup, low, high, 0.02) == "faster"
    assert speed_verdict(*speedup_ci(fast, a), 0.02) == "slower"
    # a tiny but certain difference is below min_effect: not called a speedup
    assert speed_verdict(1.01, 1.005, 1.015, 0.02) == "no measurable change"


def test_tail_percentiles_say_when_they_rest_on_too_few_samples():
    assert percentiles_ms([0.001] * 64)["unreliable"] == ["p95", "p99"]
    assert percentiles_ms([0.001] * 662)["unreliable"] == []
    stats = percentiles_ms(list(np.linspace(0.001, 0.002, 101)))
    assert stats["p50_ms"] == pytest.approx(1.5) and stats["p95_ms"] == pytest.approx(1.95)


def test_latency_presets_and_interleaved_pairs():
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(4, 8))])
    quick = LatencyMetric(warmup=0, min_seconds=0).measure(torch.nn.Linear(8, 8), CpuBackend(),
                                                           d, ctx())
    assert quick["runs"] == 64 and quick["precision"] == "quick" and "p95_ms" in quick
    assert LatencyMetric(precision="thorough")._budget() == (662, 5.0)
    small, big = torch.nn.Linear(8, 8), torch.nn.Sequential(
        *[torch.nn.Linear(8, 8) for _ in range(40)])
    base, opt, cmp = LatencyMetric(warmup=2, min_runs=40, min_seconds=0).measure_pair(
        big, small, CpuBackend(), d, ctx())
    assert base["runs"] == opt["runs"] == cmp["pairs"] == 40
    assert cmp["ci_low"] <= cmp["speedup"] <= cmp["ci_high"]
    assert cmp["verdict"] == "faster" and cmp["speedup"] > 3
    assert LatencyMetric(interleave=False).measure_pair(big, small, CpuBackend(), d,
                                                        ctx()) is None


def test_the_run_report_carries_the_interleaved_speedup(inferopt_tiny_model_factory,
                                                        inferopt_tiny_data):
    report = inferopt.run(model=inferopt_tiny_model_factory(), data=inferopt_tiny_data, save=False,
                          optimize=["prune-l1:structured=true"],
                          metrics=["latency:min_runs=20,min_seconds=0,warmup=1"])
    paired = report.comparisons["latency"]
    assert paired["pairs"] == 20 and paired["verdict"] in (
        "faster", "no measurable change", "slower")
    verdict = report.verdict
    assert verdict["speedup_ci"] == [round(paired["ci_low"], 3), round(paired["ci_high"], 3)]
    assert verdict["latency"] == paired["verdict"]
    assert report.baseline["latency"]["runs"] == report.optimized["latency"]["runs"] == 20
    assert "interleaved A/B" in " ".join(report.verdict_lines())


def test_top5_counts_labels_among_the_five_highest_logits():
    logits = torch.arange(10.0).repeat(4, 1)  # class 9 highest, then 8, 7, ...
    labels = torch.tensor([9, 5, 6, 0])
    d = inferopt.Data(eval=[inferopt.Batch(torch.zeros(4, 1), labels)])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    result = AccuracyMetric().measure(Fixed(), CpuBackend(), d, ctx())
    assert result["top1"] == 0.25 and result["top5"] == 0.75


def test_fidelity_reports_the_signal_to_noise_ratio():
    model = torch.nn.Linear(4, 3)
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(64, 4))])
    ref = [model(b.inputs).detach() for b in d.eval]
    noisy = [r + 0.01 * r.abs().mean() * torch.randn_like(r) for r in ref]
    result = FidelityMetric().measure(model, CpuBackend(), d, ctx(baseline_outputs=noisy))
    expected = 10 * np.log10(float(sum((n ** 2).sum() for n in noisy))
                             / float(sum(((n - r) ** 2).sum() for n, r in zip(noisy, ref,
                                                                            strict=True))))
    assert result["snr_db"] == pytest.approx(expected, rel=1e-4) and result["snr_db"] > 20


def test_memory_counts_activation_bytes_and_weights_by_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 8))
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(32, 256))])
    result = MemoryMetric().measure(model, CpuBackend(), d, ctx())
    # at least the [32, 1024] float hidden activation must have been alive
    assert result["peak_increase_bytes"] >= 32 * 1024 * 4
    assert result["weight_bytes_float32"] == sum(p.numel() * 4 for p in model.parameters())
    quantized = inferopt.apply(model, "int8")
    q = MemoryMetric().measure(quantized, CpuBackend(), d, ctx())
    assert q["weight_bytes_int8"] == 256 * 1024 + 1024 * 8


def test_compute_counts_macs_and_names_kernels_it_cannot_count():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(8, 64))])
    result = ComputeMetric().measure(model, CpuBackend(), d, ctx())
    assert result["macs_per_sample"] == 64 * 32 + 32 * 10
    assert result["flops_per_sample"] == 2 * result["macs_per_sample"]
    assert result["parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    pruned = ComputeMetric().measure(inferopt.apply(model, "prune-l1"), CpuBackend(), d, ctx())
    assert pruned["weight_sparsity"] == pytest.approx(0.5)
    quantized = ComputeMetric().measure(inferopt.apply(model, "int8"), CpuBackend(), d, ctx())
    assert quantized["macs_per_sample"] is None
    assert any("linear" in op for op in quantized["uncounted_ops"])


def test_throughput_sweeps_batch_sizes_over_the_same_samples():
    model = torch.nn.Linear(16, 4)
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(10, 16)) for _ in range(3)])
    result = ThroughputMetric(min_passes=1, min_seconds=0, batch_sizes=(1, 7)).measure(
        model, CpuBackend(), d, ctx())
    assert result["samples_per_s_batch1"] > 0 and result["samples_per_s_batch7"] > 0

    class WithFlag(torch.nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale

    odd = inferopt.Data(eval=[inferopt.Batch({"x": torch.randn(4, 2), "scale": 2.0})])
    with pytest.raises(inferopt.UsageError, match="re-batches the eval data"):
        ThroughputMetric(batch_sizes=(2,), min_seconds=0).measure(WithFlag(), CpuBackend(), odd,
                                                                  ctx())


def test_memory_counts_views_and_in_place_results_once():
    class Views(torch.nn.Module):
        def forward(self, x):
            y = x * 2  # the only new storage: 512 x 512 floats
            y.chunk(8), y.t(), y[::2]
            return torch.relu_(y.view(-1)).view(512, 512)

    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(512, 512))])
    result = MemoryMetric().measure(Views(), CpuBackend(), d, ctx())
    assert result["peak_increase_bytes"] == 512 * 512 * 4
    inplace = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(inplace=True),
                                  torch.nn.ReLU(inplace=True))
    assert MemoryMetric().measure(inplace, CpuBackend(), d, ctx())[
        "peak_increase_bytes"] == 512 * 512 * 4


def test_compute_counts_attention_and_int8_products_and_quantized_parameters():
    from inferopt._model_cost import count_macs

    class IntMatmul(torch.nn.Module):
        def forward(self, x):
            return torch._int_mm(x, x)

    count = count_macs(IntMatmul(), torch.randint(-3, 3, (32, 32), dtype=torch.int8))
    assert count is not None and count.complete and count.per_sample == 32 * 32
    layer = torch.nn.TransformerEncoderLayer(16, 2, 64, batch_first=True).eval()
    count = count_macs(layer, torch.randn(2, 5, 16))
    tokens = 5
    dense = tokens * (16 * 48 + 16 * 16 + 2 * 16 * 64)  # projections and feed-forward
    attention = 2 * tokens * tokens * 16  # scores and weighted values, over all heads
    assert count is not None and count.complete and count.per_sample == dense + attention
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    d = inferopt.Data(eval=[inferopt.Batch(torch.randn(8, 64))])
    quantized = ComputeMetric().measure(inferopt.apply(model, "int8"), CpuBackend(), d, ctx())
    assert quantized["parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert quantized["uncounted_ops"] == ["quantized.linear_dynamic"]


def test_the_bootstrap_stays_fast_with_many_pairs():
    import time

    a, b = _noisy(1e-3, 100_000, 5), _noisy(0.5e-3, 100_000, 6)
    start = time.perf_counter()
    speedup, low, high = speedup_ci(a, b)
    assert time.perf_counter() - start < 10
    assert low < speedup < high and 1.9 < speedup < 2.1


def test_a_relative_budget_with_a_baseline_at_zero_accuracy():
    from inferopt._report import Report
    from inferopt.plugins.metrics.accuracy import AccuracyMetric

    report = Report(run_id="r", created="now", recipe={}, plugins={}, environment={},
                    baseline={"accuracy": {"top1": 0.0}},
                    optimized={"accuracy": {"top1": 0.0}}, steps=[],
                    descriptions={"accuracy": AccuracyMetric.describe()})
    assert report.verdict["accuracy_drop_percent"] == 0.0


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path, inferopt_tiny_model_factory,
                                                      inferopt_tiny_data):
    matplotlib = pytest.importorskip("matplotlib")
    original = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        inferopt.run(model=inferopt_tiny_model_factory(), data=inferopt_tiny_data, metrics=["size"],
                     out=tmp_path / "run")
        assert (tmp_path / "run" / "plot.png").is_file()
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(original)
