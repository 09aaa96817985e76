"""tail-latency: keeps the metric contract, shows in the table with its unit and verdict, its
gates fail a run, and compare and tune read it from the reports."""

from __future__ import annotations

import json

import pytest
from convnet import DATA, SPEC
from inferopt_worked_examples.tail_latency import TailLatency

QUICK = "tail-latency:runs=60,warmup=2"


def test_keeps_the_metric_contract(inferopt_metric_contract):
    results = inferopt_metric_contract(TailLatency(runs=60, warmup=2))
    for role in ("baseline", "optimized"):
        result = results[role]
        assert result["p999_ms"] >= result["p50_ms"] > 0
        assert result["runs"] == 60 and result["reliable"] is False


def run(inferopt_cli, out, *extra):
    return inferopt_cli("run", "-m", "demo:digits-mlp-small", "-O", "prune-l1",
                        "--metric", QUICK, "--metric", "size", "--out", str(out), *extra)


def test_shown_with_its_unit_and_verdict(inferopt_cli, tmp_path):
    result = run(inferopt_cli, tmp_path / "a")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "latency p99.9" in line)
    assert row.count(" ms") == 2 and ("faster" in row or "slower" in row)
    assert any(line.startswith("tail-latency: ") for line in result.stdout.splitlines())
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["metrics"]["tail-latency"]["quantities"]["p999_ms"]["unit"] == "ms"


@pytest.mark.parametrize("gate", ["max_p999_ms=0.000001", "min_tail_speedup=1000"])
def test_a_violated_gate_fails_the_run(inferopt_cli, tmp_path, gate):
    result = run(inferopt_cli, tmp_path / "gated", "--gate", gate)
    assert result.returncode == 1, result.stderr
    assert f"gate failed: {gate.split('=')[0]}" in result.stderr
    report = json.loads((tmp_path / "gated" / "report.json").read_text())
    assert [g["passed"] for g in report["gates"]] == [False]


def test_compare_shows_its_column(inferopt_cli, tmp_path):
    for name in ("a", "b"):
        assert run(inferopt_cli, tmp_path / name).returncode == 0
    result = inferopt_cli("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--markdown")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert "latency p99.9" in header


def test_tune_optimises_the_p999_of_fused_models(inferopt_cli, tmp_path):
    result = inferopt_cli("tune", "-m", SPEC, "-d", DATA, "-t", "fuse-bn",
                          "--objective", "tail-latency.p999_ms", "--metric", QUICK,
                          "--metric", "latency:min_runs=20,min_seconds=0", "--trials", "2",
                          "--out", str(tmp_path / "tune"), "--json")
    assert result.returncode in (0, 1), result.stderr  # 1: fusion not 2% faster on a busy CPU
    summary = json.loads(result.stdout)
    assert summary["settings"]["objective"] == "tail-latency.p999_ms"
    trial = next(t for t in summary["trials"] if t["key"] == "fuse-bn")
    assert trial["status"] == "ok" and trial["accuracy_drop_points"] == 0
    assert trial["objective"] > 0
