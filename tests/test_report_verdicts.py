"""What the report concludes: findings with causes, the relative accuracy budget, plots,
`inferopt compare`, and progress bars that stay out of the way."""

from __future__ import annotations

import json

from inferopt._report import Report, StepRecord
from inferopt.plugins.metrics.accuracy import AccuracyMetric
from inferopt.plugins.metrics.fidelity import FidelityMetric
from inferopt.plugins.metrics.latency import LatencyMetric
from inferopt.plugins.metrics.size import SizeMetric
from inferopt.plugins.metrics.throughput import ThroughputMetric
from tests.helpers import SMALL

BUILT_IN = {m.name: m.describe() for m in (AccuracyMetric, FidelityMetric, LatencyMetric,
                                            SizeMetric, ThroughputMetric)}


def _report(baseline, optimized, steps, gates=(), comparisons=None, descriptions=None):
    # as the pipeline makes them: with the measured metrics' self-descriptions
    metrics = {*baseline, *optimized, *(comparisons or {})}
    return Report(run_id="r", created="now", recipe={}, plugins={}, baseline=baseline,
                  optimized=optimized, steps=steps, environment={}, gates=list(gates),
                  comparisons=comparisons or {},
                  descriptions=descriptions or {m: BUILT_IN[m] for m in metrics if m in BUILT_IN})


def _step(name, kind, **details):
    return StepRecord(index=1, name=name, options={}, plugin=name, distribution="inferopt",
                      version="0", details=details, kind=kind)


def test_findings_name_what_went_wrong_and_why():
    same_speed = {"latency": {"speedup": 1.0, "ci_low": 0.97, "ci_high": 1.03,
                              "confidence": 0.95, "verdict": "no measurable change"}}
    pruned = _report({"latency": {"p50_ms": 1.0}}, {"latency": {"p50_ms": 1.0}},
                     [_step("prune-l1", "pruning", mode="unstructured")],
                     comparisons=same_speed)
    findings = {f["finding"]: f["cause"] for f in pruned.verdict["findings"]}
    assert "use prune-l1:structured=true" in findings["pruned but not faster"]
    quantized = _report({"size": {"bytes": 100}}, {"size": {"bytes": 100}},
                        [_step("int8", "quantization", quantized=[])])
    assert quantized.verdict["findings"] == [
        {"finding": "quantized but not smaller",
         "cause": "no layer was quantized (see the step's skipped layers)"}]
    slower = _report({}, {}, [_step("int4", "quantization", quantized=["fc"])],
                     comparisons={"latency": {"speedup": 0.5, "ci_low": 0.45, "ci_high": 0.55,
                                              "verdict": "slower"}})
    slower.steps[0].warnings.append("int4: path=dequant dequantizes the weights on every call: "
                                    "smallest memory, slower than fp32 on most hardware")
    assert slower.verdict["findings"][0]["finding"] == "slower than baseline"
    assert "dequantizes" in slower.verdict["findings"][0]["cause"]
    fine = _report({}, {}, [_step("prune-l1", "pruning", mode="structured")],
                   comparisons={"latency": {"speedup": 2.0, "ci_low": 1.9, "ci_high": 2.1,
                                            "verdict": "faster"}})
    assert fine.verdict["findings"] == []


def test_relative_accuracy_budget_stops_the_run_at_the_step(cli):
    result = cli("run", *SMALL, "--optimize", "prune-l1:sparsity=0.95",
                 "--max-accuracy-drop", "1%", "--json")
    assert result.returncode == 1 and result.stdout == ""
    assert "step 1 'prune-l1' dropped accuracy top-1" in result.stderr
    assert "% of the baseline (budget 1.0%)" in result.stderr
    within = cli("run", *SMALL, "--optimize", "prune-l1:sparsity=0.05",
                 "--max-accuracy-drop", "50%", "--json")
    assert within.returncode == 0, within.stderr
    report = json.loads(within.stdout)
    gate = report["gates"][0]
    assert gate["name"] == "max_relative_accuracy_drop" and gate["passed"]
    base = report["baseline"]["metrics"]["accuracy"]["top1"]
    opt = report["optimized"]["metrics"]["accuracy"]["top1"]
    assert abs(report["verdict"]["accuracy_drop_percent"] - (base - opt) / base * 100) < 1e-2
    bad = cli("run", *SMALL, "--max-accuracy-drop", "one point")
    assert bad.returncode == 2 and "give points of accuracy (1.0)" in bad.stderr


def test_an_accuracy_gate_failure_is_a_finding():
    gate = {"name": "max_accuracy_drop", "threshold": 1.0, "value": 3.5, "passed": False}
    report = _report({"accuracy": {"top1": 0.9}}, {"accuracy": {"top1": 0.865}},
                     [_step("int8", "quantization", quantized=["fc"])], gates=[gate])
    finding = report.verdict["findings"][0]
    assert finding["finding"] == "outside the accuracy budget"
    assert "max_accuracy_drop 3.5 > 1.0 after int8" in finding["cause"]


def test_runs_are_plotted_and_compared(cli, tmp_path):
    first = cli("run", *SMALL, "--out", str(tmp_path / "a"))
    second = cli("run", *SMALL, "--optimize", "prune-l1:structured=true",
                 "--out", str(tmp_path / "b"))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    png = (tmp_path / "a" / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    table = cli("compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json"),
                "--markdown", "--plot", str(tmp_path / "both.png"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].startswith("| run | steps |") and len(lines) == 4
    assert "int8" in lines[2] and "prune-l1" in lines[3]
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
    assert lines[0].startswith("| run | steps | backend |") and "| cpu |" in lines[2]
    rows = json.loads(cli("compare", str(tmp_path / "a"), "--json").stdout)
    assert rows[0]["latency verdict"] in ("faster", "no measurable change", "slower")
    elsewhere = cli("run", *SMALL, "--backend", "cpu:threads=1", "--baseline-backend", "cpu",
                    "--out", str(tmp_path / "c"))
    assert elsewhere.returncode == 0, elsewhere.stderr
    rows = json.loads(cli("compare", str(tmp_path / "c"), "--json").stdout)
    assert rows[0]["backend"] == "cpu:threads=1 (baseline on cpu)"
    again = cli("compare", str(tmp_path / "a"), "--plot", str(tmp_path / "both.png"))
    assert again.returncode == 2 and "the file exists" in again.stderr
    (tmp_path / "x.json").write_text('{"schema": "other/1"}')
    wrong = cli("compare", str(tmp_path / "x.json"))
    assert wrong.returncode == 2 and "not an inferopt report" in wrong.stderr


def test_progress_bars_only_when_wanted(cli):
    args = [*SMALL, "--optimize", "prune-l1:finetune_steps=40"]
    shown = cli("run", *args, env={"INFEROPT_PROGRESS": "1"})
    assert shown.returncode == 0 and "fine-tuning (steps)" in shown.stderr
    quiet = cli("run", *args, "--json", env={"INFEROPT_PROGRESS": "1"})
    assert quiet.returncode == 0 and "fine-tuning (steps)" not in quiet.stderr
    default = cli("run", *args)  # stderr is not a terminal here
    assert "fine-tuning (steps)" not in default.stderr


def test_the_table_shows_the_sweep_and_marks_thin_tail_percentiles():
    base = {"throughput": {"samples_per_s": 30000.0, "samples_per_s_batch1": 6000.0},
            "latency": {"p50_ms": 2.0, "p99_ms": 3.0, "unreliable": ["p99"]},
            "fidelity": {"snr_db": None, "cosine": 1.0}}
    opt = {"throughput": {"samples_per_s": 50000.0, "samples_per_s_batch1": 4000.0},
           "latency": {"p50_ms": 1.0, "p99_ms": 2.0, "unreliable": ["p99"]},
           "fidelity": {"snr_db": 42.5, "cosine": 0.99}}
    report = _report(base, opt, [])
    # the report renders what the metrics describe of themselves, stored in it
    report.descriptions = {m.name: m.describe() for m in (ThroughputMetric, LatencyMetric,
                                                          FidelityMetric)}
    rows = {r[0]: r[1:] for r in report.rows()}
    assert rows["throughput (samples/s)"] == ("30,000", "50,000", "x1.67", "better")
    assert rows["throughput at batch 1"] == ("6,000", "4,000", "x0.67", "worse")
    assert rows["latency p99 (few runs)"][2:] == ("x1.50 faster", "better")
    assert rows["output SNR vs baseline"] == ("-", "42.5 dB", "-", "")


def test_improvement_is_the_times_better_and_the_verdicts_judgement():
    paired = {"latency": {"speedup": 1.8, "ci_low": 1.7, "ci_high": 1.9, "confidence": 0.95,
                          "verdict": "faster"}}
    report = _report({"latency": {"p50_ms": 2.0, "p90_ms": 2.0}, "size": {"bytes": 400}},
                     {"latency": {"p50_ms": 1.0, "p90_ms": 1.96}, "size": {"bytes": 100}}, [],
                     comparisons=paired)
    assert report.improvement("latency") == (1.8, "better")  # the paired estimate, not 2.0
    # another field of a paired metric: judged as the report's row, without the noise band
    ratio, judged = report.improvement("latency", "p90_ms")
    assert abs(ratio - 2.0 / 1.96) < 1e-9 and judged == "better"
    row = next(r for r in report.rows() if r[0] == "latency p90")
    assert row[4] == judged
    assert report.improvement("size") == (4.0, "better")
    assert report.improvement("accuracy") == (None, "")  # not measured
    no_ci = _report({"latency": {"p50_ms": 2.0, "p90_ms": 2.0}},
                    {"latency": {"p50_ms": 2.5, "p90_ms": 1.96}}, [])
    ratio, judged = no_ci.improvement("latency")
    assert abs(ratio - 0.8) < 1e-9 and judged == "worse"
    assert no_ci.improvement("latency", "p90_ms")[1] == "same"  # unpaired: latency's 5% band
