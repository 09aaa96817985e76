"""Tests for inferopt-example-plugin, using the fixtures of ``inferopt.testing`` (a pytest plugin that inferopt
installs): ``inferopt_cli``, ``inferopt_tiny_model``, ``inferopt_tiny_data``,
``inferopt_roundtrip``, ``inferopt_metric_contract``."""

from __future__ import annotations

import json

import torch

import inferopt


def test_plugin_is_listed_with_its_distribution_and_hooks(inferopt_cli):
    result = inferopt_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugin = next(p for p in json.loads(result.stdout)["plugins"] if p["name"] == "half")
    assert plugin["distribution"] == "inferopt-example-plugin"
    assert {"inferopt_register_optimizers", "inferopt_register_metrics"} <= set(plugin["hooks"])


def test_optimizer_changes_the_weights_and_keeps_outputs_close(inferopt_tiny_model,
                                                               inferopt_tiny_data):
    x = inferopt_tiny_data.eval[0].inputs
    ref = inferopt_tiny_model(x).detach()
    model = inferopt.apply(inferopt_tiny_model, "half")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(x)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99


def test_runs_in_a_pipeline_and_survives_save_and_load(inferopt_roundtrip):
    report, loaded = inferopt_roundtrip("half", metrics=["flops", "size", "fidelity"])
    assert report.optimized["size"]["bytes"] < 0.6 * report.baseline["size"]["bytes"]
    assert report.optimized["flops"]["flops_per_sample"] > 0
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_a_bad_option_is_reported_with_the_allowed_values(inferopt_cli):
    result = inferopt_cli("run", "--optimize", "half:dtype=int3")
    assert result.returncode == 2
    assert "option 'dtype' got 'int3'; allowed: one of bfloat16, float16" in result.stderr


def test_metric_keeps_the_metric_contract(inferopt_metric_contract):
    results = inferopt_metric_contract("flops")
    # the tiny MLP (16 -> 32 -> 4): 2 * (16 * 32 + 32 * 4) floating-point operations per sample
    assert results["baseline"]["flops_per_sample"] == 2 * (16 * 32 + 32 * 4)
