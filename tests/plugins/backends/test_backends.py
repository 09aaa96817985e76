"""cpu, cuda, and the in-process variants of data-parallel and model-parallel; the torchrun
variants are in test_distributed_backends.py."""

from __future__ import annotations

import json

import pytest
import torch

from inferopt._contract import Batch, PrepareContext
from inferopt._errors import UsageError
from inferopt.plugins.backends import stage_split
from inferopt.plugins.backends.cpu import CpuBackend
from inferopt.plugins.backends.data_parallel import DataParallelBackend
from inferopt.plugins.backends.model_parallel import ModelParallelBackend, microbatch_count
from inferopt.plugins.metrics.accuracy import AccuracyMetric
from inferopt.plugins.metrics.fidelity import FidelityMetric
from inferopt.plugins.metrics.latency import LatencyMetric
from inferopt.plugins.metrics.throughput import ThroughputMetric
from tests.plugins.backends.distributed_worker import batches, small_model

SMALL_RUN = ["--model", "demo:digits-mlp-small", "-O", "none", "--metric", "fidelity",
             "--metric", "accuracy", "--json"]


def reference() -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([small_model()(b.inputs) for b in batches()])


def test_cpu_bf16_autocast_runs_in_bfloat16_close_to_fp32() -> None:
    backend = CpuBackend(autocast="bf16")
    out = torch.cat(backend.run_all(backend.prepare(small_model(), PrepareContext()), batches()))
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference()).abs().max() < 0.05
    facts = backend.describe()
    assert facts["autocast"] == "bf16" and facts["cores"] >= 1 and "threads" in facts


def test_cuda_without_a_gpu_is_a_clear_error(cli) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli("run", *SMALL_RUN, "--backend", "cuda")
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "cpu backend" in result.stderr


@pytest.mark.parametrize("backend", ["data-parallel", "model-parallel"])
def test_parallel_backends_without_workers_say_how_to_launch(cli, backend: str) -> None:
    result = cli("run", *SMALL_RUN, "--backend", backend)
    assert result.returncode == 2
    assert "torchrun --nproc-per-node" in result.stderr and "devices=" in result.stderr


def test_devices_that_do_not_exist_are_named(cli) -> None:
    result = cli("run", *SMALL_RUN, "--backend", "data-parallel:devices=cuda:0|cuda:7")
    assert result.returncode == 2
    assert "cuda:" in result.stderr and ("no CUDA device" in result.stderr
                                         or "does not exist" in result.stderr)


def test_single_process_backend_under_torchrun_is_refused(cli) -> None:
    result = cli("run", *SMALL_RUN, env={"WORLD_SIZE": "2"})
    assert result.returncode == 2
    assert "torchrun started 2 processes" in result.stderr
    assert "data-parallel" in result.stderr


def test_data_parallel_over_devices_matches_one_device() -> None:
    backend = DataParallelBackend(devices=("cpu", "cpu"))
    out = backend.run_all(backend.prepare(small_model(), PrepareContext()), batches())
    assert (torch.cat(out) - reference()).abs().max() <= 1e-5
    assert [o.shape[0] for o in out] == [b.size for b in batches()]


def test_data_parallel_run_reports_every_sample(cli) -> None:
    result = cli("run", *SMALL_RUN, "--backend", "data-parallel:devices=cpu|cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["baseline"]["metrics"]["accuracy"]["samples"] == 359
    assert report["baseline"]["metrics"]["fidelity"]["max_abs_err"] < 1e-6
    assert report["environment"]["workers"] == 2


@pytest.mark.parametrize("microbatches", [1, 4])
def test_model_parallel_over_devices_matches_unsplit(microbatches: int) -> None:
    backend = ModelParallelBackend(devices=("cpu", "cpu"), microbatches=microbatches)
    prepared = backend.prepare(small_model(), PrepareContext())
    out = backend.run_all(prepared, batches())
    assert (torch.cat(out) - reference()).abs().max() <= 1e-5
    assert len(prepared.split_points) == 1


def test_model_parallel_keeps_the_models_output_structure() -> None:
    class DictOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return {"logits": self.b(torch.relu(h)), "hidden": h}

    model = DictOut().eval()
    backend = ModelParallelBackend(devices=("cpu", "cpu"), microbatches=2)
    x = torch.randn(4, 4)
    out = backend.forward(backend.prepare(model, PrepareContext()), x)
    assert isinstance(out, dict) and list(out) == ["logits", "hidden"]
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out["logits"], ref["logits"])
    torch.testing.assert_close(out["hidden"], ref["hidden"])


def test_model_parallel_split_given_by_name() -> None:
    backend = ModelParallelBackend(devices=("cpu", "cpu", "cpu"), split=("4", "2"))
    prepared = backend.prepare(small_model(), PrepareContext())
    out = backend.forward(prepared, batches()[0].inputs)
    assert (out - reference()[:8]).abs().max() <= 1e-5
    assert prepared.split_points == ["2", "4"]  # put in the order they run


def test_bad_split_point_names_the_modules() -> None:
    backend = ModelParallelBackend(devices=("cpu", "cpu"), split=("layer9",))
    with pytest.raises(UsageError, match=r"'layer9' is not a module name.*0, 1, 2"):
        backend.forward(backend.prepare(small_model(), PrepareContext()), batches()[0].inputs)


def test_split_count_must_match_stages() -> None:
    backend = ModelParallelBackend(devices=("cpu", "cpu"), split=("2", "4"))
    with pytest.raises(UsageError, match="make 3 stages, but devices= lists 2"):
        backend.forward(backend.prepare(small_model(), PrepareContext()), batches()[0].inputs)


def test_more_stages_than_layers_is_a_clear_error() -> None:
    backend = ModelParallelBackend(devices=("cpu",) * 9)
    with pytest.raises(UsageError, match="cannot be cut into 9 stages"):
        backend.forward(backend.prepare(small_model(), PrepareContext()), batches()[0].inputs)


def test_automatic_split_balances_parameters() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
        torch.nn.Linear(64, 512), torch.nn.Linear(512, 8))
    calls = stage_split.profile_calls(model, lambda: model(torch.randn(2, 64)))
    # parameters: 4160 x3, 33280, 4104: the big layer gets a stage of its own
    assert stage_split.choose_split_points(calls, 2, "params") == ["3"]
    assert stage_split.choose_split_points(calls, 3, "params") == ["3", "4"]


def test_microbatch_count_divides_the_batch() -> None:
    assert microbatch_count(64, 4) == 4
    assert microbatch_count(39, 4) == 3
    assert microbatch_count(7, 4) == 1
    assert microbatch_count(2, 4) == 2


def test_metrics_combine_workers() -> None:
    acc = AccuracyMetric().combine([{"top1": 1.0, "correct": 3, "samples": 3},
                                    {"top1": 0.0, "correct": 0, "samples": 1}])
    assert acc == {"top1": 0.75, "correct": 3, "samples": 4}
    thr = ThroughputMetric().combine([
        {"samples_per_s": 100.0, "samples": 100, "seconds": 1.0},
        {"samples_per_s": 200.0, "samples": 100, "seconds": 0.5}])
    assert thr["samples_per_s"] == 200.0 and thr["workers"] == 2  # 200 samples in 1 s
    lat = {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0, "std_ms": 0.0,
           "min_ms": 1.0, "mean_ms": 1.0, "runs": 10, "batch_size": 8, "threads": 1}
    merged = LatencyMetric().combine([lat, {**lat, "p50_ms": 3.0, "mean_ms": 3.0}])
    assert merged["p50_ms"] == 3.0 and merged["mean_ms"] == 2.0
    assert merged["per_worker_p50_ms"] == [1.0, 3.0]
    fid = FidelityMetric().combine([
        {"cosine": 1.0, "max_abs_err": 0.1, "mean_abs_err": 0.1, "agreement": 1.0,
         "samples": 3, "elements": 30, "positions": 3, "signal_energy": 50.0,
         "noise_energy": 0.3},
        {"cosine": 0.0, "max_abs_err": 0.5, "mean_abs_err": 0.5, "agreement": 0.0,
         "samples": 1, "elements": 10, "positions": 1, "signal_energy": 50.0,
         "noise_energy": 0.7}])
    assert fid["cosine"] == 0.75 and fid["max_abs_err"] == 0.5 and fid["agreement"] == 0.75
    assert fid["snr_db"] == 20.0  # 100 / 1.0 over both workers


def test_batches_fewer_than_workers_is_a_clear_error() -> None:
    class TwoWorkers(DataParallelBackend):
        @property
        def world_size(self) -> int:
            return 2

    with pytest.raises(UsageError, match="needs at least 2 eval batches"):
        TwoWorkers(devices=("cpu", "cpu")).shard_indices(1)


def test_default_run_all_keeps_order() -> None:
    backend = CpuBackend()
    data = [Batch(torch.full((2, 16), float(i))) for i in range(3)]
    out = backend.run_all(backend.prepare(small_model(), PrepareContext()), data)
    with torch.inference_mode():
        for b, o in zip(data, out, strict=True):
            assert torch.equal(o, small_model()(b.inputs))


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("options", [{}, {"cuda_graphs": True}, {"autocast": "fp16"}])
def test_cuda_matches_cpu(options: dict) -> None:
    from inferopt.plugins.backends.cuda import CudaBackend

    backend = CudaBackend(**options)
    out = backend.run_all(backend.prepare(small_model(), PrepareContext()), batches())
    tolerance = 2e-2 if options.get("autocast") else 1e-3
    assert (torch.cat(out).float() - reference()).abs().max() <= tolerance
    facts = backend.describe()
    assert facts["memory_total_mb"] > 0 and facts["gpu"]


@pytest.mark.cuda
@needs_gpu
def test_cuda_event_timing_waits_for_the_gpu() -> None:
    import time

    from inferopt.plugins.backends.cuda import CudaBackend

    backend = CudaBackend()
    a = torch.randn(2048, 2048, device="cuda")

    def work() -> None:
        for _ in range(20):
            a @ a

    backend.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    timed = backend.time(work)
    assert timed > 0.2 * wall  # queued kernels counted, not only their launch


@pytest.mark.cuda
@needs_gpu
def test_parallel_backends_in_process_on_cuda() -> None:
    dp = DataParallelBackend(devices=("cuda:0", "cuda:0"))
    out = dp.run_all(dp.prepare(small_model(), PrepareContext()), batches())
    assert (torch.cat(out) - reference()).abs().max() <= 1e-3
    mp = ModelParallelBackend(devices=("cpu", "cuda:0"))
    out = mp.run_all(mp.prepare(small_model(), PrepareContext()), batches())
    assert (torch.cat(out) - reference()).abs().max() <= 1e-3
