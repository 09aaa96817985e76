"""Metrics that describe their own numbers: a third-party p99.9 tail-latency metric is shown,
stored, gated, compared and tuned for like a built-in one; and the generic rendering."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

import inferopt
from inferopt import Gate, Metric, Quantity
from inferopt._quantities import evaluate_gates, format_change, format_value, judge, metric_rows

TAIL_PLUGIN = '''
import time

from inferopt import Gate, Metric, Quantity, hookimpl


class TailLatency(Metric):
    """p99.9 latency per batch."""

    name = "tail"
    summary = "p99.9 latency per batch"
    primary = "p999_ms"
    quantities = {"p999_ms": Quantity("ms", "lower", "speedup", "latency p99.9"),
                  "runs": Quantity("", None, None, show=False)}
    gates = {"min_tail_speedup": Gate("p999_ms", "min_change",
                                      help="exit 1 if the p99.9 speedup is below this")}

    def measure(self, model, backend, data, ctx):
        times = []
        for _ in range(20):
            for batch in data.eval[:2]:
                start = time.perf_counter()
                backend.forward(model, backend.to_device(batch.inputs))
                times.append((time.perf_counter() - start) * 1000)
        times.sort()
        return {"p999_ms": times[min(len(times) - 1, int(len(times) * 0.999))],
                "runs": len(times)}


@hookimpl
def inferopt_register_metrics(register):
    register(TailLatency)
'''

RUN = ["--model", "demo:digits-mlp-small", "--metric", "tail", "--metric", "size"]


@pytest.fixture
def tail_env(plugin_env: Any) -> dict[str, str]:
    return plugin_env("inferopt-tail", {"tail": "tail_plugin"}, {"tail_plugin": TAIL_PLUGIN})


def test_a_third_party_metric_is_shown_stored_and_gated(cli: Any, tail_env: Any,
                                                          tmp_path: Any) -> None:
    shown = cli("run", *RUN, "--out", str(tmp_path / "a"), env=tail_env)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if "latency p99.9" in line)
    assert " ms " in row and ("faster" in row or "slower" in row)
    assert any(word in row for word in ("better", "worse", "same"))
    assert "tail: " in shown.stdout  # its verdict line, from its primary quantity
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["metrics"]["tail"]["quantities"]["p999_ms"] == {
        "unit": "ms", "better": "lower", "change": "speedup", "label": "latency p99.9",
        "show": True, "same_within": 0.0, "same_within_relative": 0.0,
        "words": ["better", "worse", "same"]}
    assert report["metrics"]["tail"]["gates"]["min_tail_speedup"]["kind"] == "min_change"

    gated = cli("run", *RUN, "--gate", "min_tail_speedup=1000", "--json", env=tail_env)
    assert gated.returncode == 1, gated.stderr
    assert "gate failed: min_tail_speedup" in gated.stderr
    [gate] = json.loads(gated.stdout)["gates"]
    assert gate["metric"] == "tail" and not gate["passed"] and gate["value"] > 0

    listing = cli("plugins", env=tail_env)
    assert "min_tail_speedup (tail, min_change of p999_ms)" in listing.stdout


def test_unknown_gate_lists_the_known_ones_with_their_metric(cli: Any, tail_env: Any) -> None:
    result = cli("run", *RUN, "--gate", "max_tail=2", env=tail_env)
    assert result.returncode == 2
    assert "unknown gate(s) max_tail" in result.stderr
    assert "min_tail_speedup (tail)" in result.stderr and "min_speedup (latency)" in result.stderr
    bad = cli("run", *RUN, "--gate", "min_tail_speedup", env=tail_env)
    assert bad.returncode == 2 and "write NAME=NUMBER" in bad.stderr


def test_the_old_gate_flags_go_through_the_metrics_gates(cli: Any) -> None:
    result = cli("run", "--model", "demo:digits-mlp-small", "--metric", "size",
                 "--max-size-ratio", "0.01", "--json")
    assert result.returncode == 1
    [gate] = json.loads(result.stdout)["gates"]
    assert gate["name"] == "max_size_ratio" and gate["metric"] == "size"
    assert 0.1 < gate["value"] < 0.5  # int8 weights: about a quarter of float32


def test_compare_shows_the_third_party_column_without_the_plugin(cli: Any, tail_env: Any,
                                                                 tmp_path: Any) -> None:
    for name, steps in (("a", ["-O", "none"]), ("b", ["-O", "int8"])):
        result = cli("run", *RUN, *steps, "--out", str(tmp_path / name), env=tail_env)
        assert result.returncode == 0, result.stderr
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    for env in (tail_env, None):  # None: the plugin is not installed when comparing
        table = cli("compare", *runs, "--json", env=env)
        assert table.returncode == 0, table.stderr
        rows = json.loads(table.stdout)
        assert all(" ms -> " in r["latency p99.9"] for r in rows)
        assert "runs" not in rows[0]  # show=False
        assert "%" in rows[1]["size (saved weights)"]
    markdown = cli("compare", *runs, "--markdown").stdout.splitlines()
    assert "latency p99.9" in markdown[0]


def test_tune_optimises_a_third_party_quantity(cli: Any, tail_env: Any, tmp_path: Any) -> None:
    out = tmp_path / "tune"
    result = cli("tune", "--model", "demo:digits-mlp-small",
                 "--metric", "latency:min_runs=20,min_seconds=0,warmup=1",
                 "--objective", "tail.p999_ms", "--trials", "1", "-t", "int8",
                 "--out", str(out), "--json", env=tail_env)
    doc = json.loads(result.stdout)
    assert doc["settings"]["objective"] == "tail.p999_ms"
    assert "better tail.p999_ms" in doc["goal"]
    trial = next(t for t in doc["trials"] if t["key"] != "none")
    assert trial["objective"] is None or trial["objective"] > 0
    wrong = cli("tune", "--model", "demo:digits-mlp-small", "--objective", "tail.runs",
                "--out", str(tmp_path / "t2"), env=tail_env)
    assert wrong.returncode == 2 and "tail.p999_ms" in wrong.stderr


# --- rendering -------------------------------------------------------------------------------


def test_values_show_their_unit_and_changes_their_kind() -> None:
    assert format_value(1.23456, "ms") == "1.235 ms"
    assert format_value(2_500_000, "bytes") == "2.50 MB"
    assert format_value(0.9749, "fraction") == "97.49%"
    assert format_value(3.0, "req") == "3 req"
    assert format_change("speedup", 2.0, 1.0) == "x2.00 faster"
    assert format_change("speedup", 1.0, 2.0) == "x2.00 slower"
    assert format_change("percent", 100, 25) == "25.0%"
    assert format_change("points", 0.9, 0.885) == "-1.50 pts"
    assert format_change("ratio", 100, 150) == "x1.50"
    assert (judge("lower", 2.0, 1.0), judge("higher", 2.0, 1.0), judge(None, 2.0, 1.0),
            judge("higher", 1.0, 1.0)) == ("better", "worse", "", "same")


def test_rows_follow_the_description_and_skip_hidden_quantities() -> None:
    description = {"quantities": {
        "p999_ms": inferopt.Quantity("ms", "lower", "speedup", "p99.9").to_dict(),
        "qps_b*": inferopt.Quantity("", "higher", "ratio", "qps at batch {}").to_dict(),
        "debug": inferopt.Quantity(show=False).to_dict()}}
    rows = metric_rows("tail", description, {"p999_ms": 4.0, "qps_b8": 10.0, "debug": 1},
                       {"p999_ms": 2.0, "qps_b8": 5.0, "debug": 2})
    assert [(r["label"], r["change"], r["better"]) for r in rows] == [
        ("p99.9", "x2.00 faster", "better"), ("qps at batch 8", "x0.50", "worse")]
    with pytest.raises(ValueError, match="better="):
        inferopt.Quantity(better="up")
    with pytest.raises(ValueError, match="kind="):
        inferopt.Gate("x", "at_least")


def test_gates_check_drops_changes_and_prefer_the_paired_estimate() -> None:
    descriptions = {"acc": {"quantities": {"top1": inferopt.Quantity(
        "fraction", "higher", "points").to_dict()}, "gates": {
        "max_drop": inferopt.Gate("top1", "max_drop").to_dict(),
        "max_rel": inferopt.Gate("top1", "max_relative_drop").to_dict()}},
        "lat": {"quantities": {"p50": inferopt.Quantity("ms", "lower", "speedup").to_dict()},
                "gates": {"min_x": inferopt.Gate("p50", "min_change",
                                                 comparison="speedup").to_dict()}}}
    records = evaluate_gates({"max_drop": 1.0, "max_rel": 5.0, "min_x": 1.5}, descriptions,
                             {"acc": {"top1": 0.90}, "lat": {"p50": 2.0}},
                             {"acc": {"top1": 0.88}, "lat": {"p50": 1.0}},
                             {"lat": {"speedup": 1.4}})
    got = {r["name"]: (round(r["value"], 3), r["passed"]) for r in records}
    assert got == {"max_drop": (2.0, False), "max_rel": (2.222, True), "min_x": (1.4, False)}


def test_a_change_within_same_within_is_judged_same():
    from inferopt._quantities import judge

    assert judge("higher", 1.0, 0.99998, same_within=1e-4) == "same"
    assert judge("higher", 1.0, 0.997, same_within=1e-4) == "worse"
    assert judge("higher", 1.0, 0.99998) == "worse"  # no tolerance declared: any change
    assert judge("lower", 2.0, 1.0, same_within=0.5) == "better"


# --- aspects, published numbers and shared gate names: nothing in the core names a metric ----


class _Jitter(Metric):
    """A third-party speed metric with a gate it publishes, and nothing built in beside it."""

    name = "jitter"
    primary = "spread_ms"
    aspect = "speed"
    quantities = {"spread_ms": Quantity("ms", "lower", "ratio", "jitter")}
    gates = {"max_jitter_ratio": Gate("spread_ms", "max_change", reported_as="jitter_ratio"),
             "min_speedup": Gate("spread_ms", "min_change")}

    def measure(self, model, backend, data, ctx):  # pragma: no cover - not run here
        return {}


class _Agreement(Metric):
    """A third-party quality metric with a drop budget."""

    name = "agree"
    primary = "share"
    aspect = "quality"
    quantities = {"share": Quantity("fraction", "higher", "points", "agreement")}
    gates = {"max_agree_drop": Gate("share", "max_drop")}

    def measure(self, model, backend, data, ctx):

        from inferopt.utils import primary_output

        agree = total = 0
        for batch, reference in zip(data.eval, ctx.baseline_outputs or [], strict=False):
            out = primary_output(backend.forward(model, backend.to_device(batch.inputs)))
            ref = primary_output(reference)
            agree += int((out.argmax(-1).cpu() == ref.argmax(-1).cpu()).sum())
            total += out.shape[0]
        return {"share": agree / total if total else 1.0}


def _described(*metrics: type[Metric]) -> dict[str, dict[str, Any]]:
    return {m.name: m.describe() for m in metrics}


def test_findings_and_published_numbers_come_from_the_metrics_descriptions() -> None:
    from inferopt._report import Report, StepRecord

    step = StepRecord(index=1, name="prune-l1", options={}, plugin="p", distribution="d",
                      version="0", kind="pruning", details={"mode": "structured"})
    report = Report(run_id="r", created="now", recipe={}, plugins={}, environment={},
                    baseline={"jitter": {"spread_ms": 1.0}},
                    optimized={"jitter": {"spread_ms": 2.0}}, steps=[step],
                    descriptions=_described(_Jitter))
    verdict = report.verdict
    assert verdict["jitter_ratio"] == 2.0  # published whether or not the gate was set
    assert verdict["jitter"] == "worse"
    findings = [f["finding"] for f in verdict["findings"]]
    assert findings == ["slower than baseline", "pruned but not faster"]
    # the same numbers with no aspect: nothing concluded about speed
    plain = {"jitter": {**_Jitter.describe(), "aspect": None}}
    quiet = Report(run_id="r", created="now", recipe={}, plugins={}, environment={},
                   baseline=report.baseline, optimized=report.optimized, steps=[step],
                   descriptions=plain)
    assert quiet.verdict["findings"] == []


def test_a_gate_name_two_metrics_offer_must_be_qualified() -> None:
    from inferopt._errors import UsageError
    from inferopt._quantities import check_gates, offered_gates
    from inferopt.plugins.metrics.latency import LatencyMetric

    installed = {"latency": LatencyMetric, "jitter": _Jitter}
    offered = offered_gates(installed)
    assert "min_speedup" not in offered and offered["latency.min_speedup"][0] == "latency"
    with pytest.raises(UsageError, match=r"latency\.min_speedup or jitter\.min_speedup"):
        check_gates({"min_speedup": 1.0}, offered, {"latency", "jitter"}, installed)
    check_gates({"jitter.min_speedup": 1.0}, offered, {"jitter"}, installed)
    [record] = evaluate_gates({"jitter.min_speedup": 0.9}, _described(LatencyMetric, _Jitter),
                              {"jitter": {"spread_ms": 1.0}}, {"jitter": {"spread_ms": 0.5}},
                              {})
    assert record["metric"] == "jitter" and record["value"] == 0.5 and not record["passed"]


def test_a_third_party_quality_budget_stops_the_run_at_the_step(tmp_path: Any) -> None:
    from inferopt import BudgetExceeded

    session = inferopt.Session()
    session.register(sys.modules[__name__], name="test-agree")
    with pytest.raises(BudgetExceeded, match=r"step 1 'prune-l1' dropped agreement from "
                                             r"100\.00% to .*points \(budget 0\.5\)"):
        session.run(model="demo:digits-mlp-small", optimize=["prune-l1:sparsity=0.97"],
                    metrics=["agree"], gates={"max_agree_drop": 0.5}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@inferopt.hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(_Agreement)


def test_a_paired_speed_verdict_outweighs_unpaired_throughput_noise() -> None:
    from inferopt._report import Report, StepRecord
    from inferopt.plugins.metrics.latency import LatencyMetric
    from inferopt.plugins.metrics.throughput import ThroughputMetric

    step = StepRecord(index=1, name="prune-l1", options={}, plugin="p", distribution="d",
                      version="0", kind="pruning", details={"mode": "unstructured"})
    for throughput, verdict in ((0.8, "no measurable change"), (1.3, "no measurable change"),
                                (1.3, "faster")):
        report = Report(
            run_id="r", created="now", recipe={}, plugins={}, environment={}, steps=[step],
            baseline={"latency": {"p50_ms": 1.0}, "throughput": {"samples_per_s": 100.0}},
            optimized={"latency": {"p50_ms": 1.0},
                       "throughput": {"samples_per_s": 100.0 * throughput}},
            comparisons={"latency": {"speedup": 1.0, "ci_low": 0.9, "ci_high": 1.1,
                                     "verdict": verdict}},
            descriptions=_described(LatencyMetric, ThroughputMetric))
        findings = [f["finding"] for f in report.verdict["findings"]]
        expected = [] if verdict == "faster" else ["pruned but not faster"]
        assert findings == expected, (throughput, verdict)


def test_the_unpaired_noise_band_is_five_percent_of_the_change_either_way() -> None:
    from inferopt._report import Report
    from inferopt.plugins.metrics.latency import LatencyMetric

    def latency(speedup: float, comparison: Any = None) -> Any:
        return Report(run_id="r", created="now", recipe={}, plugins={}, environment={},
                      steps=[], baseline={"latency": {"p50_ms": 1.0}},
                      optimized={"latency": {"p50_ms": 1.0 / speedup}},
                      comparisons={"latency": comparison} if comparison else {},
                      descriptions=_described(LatencyMetric))

    assert latency(1.051).verdict["latency"] == "faster"
    assert latency(1.049).verdict["latency"] == "no measurable change"
    assert latency(0.949).verdict["latency"] == "slower"
    assert latency(0.951).verdict["latency"] == "no measurable change"
    # measured in pairs, the table's row says what the paired verdict says
    paired = latency(1.04, {"speedup": 1.04, "ci_low": 1.03, "ci_high": 1.05,
                            "verdict": "faster"})
    assert paired.rows()[0][-1] == "better"
    assert latency(1.04).rows()[0][-1] == "same"


def test_descriptions_are_checked_when_written() -> None:
    with pytest.raises(ValueError, match="three words"):
        Quantity(words=("up", "down"))
    with pytest.raises(TypeError, match="aspect 'latency' is not one of speed, size, quality"):
        type("Bad", (Metric,), {"name": "bad", "aspect": "latency",
                                "measure": lambda *a: {}})


def test_a_paired_verdict_in_other_words_falls_back_to_the_numbers() -> None:
    from inferopt._quantities import judgement

    description = _Jitter.describe()
    found = judgement(description, {"spread_ms": 1.0}, {"spread_ms": 2.0},
                      {"verdict": "slower"})
    assert found == ("worse", "worse")


def test_gates_qualified_in_toml_and_resolved_among_the_runs_metrics(tmp_path: Any) -> None:
    from inferopt._quantities import check_gates, offered_gates
    from inferopt._recipe import make_recipe
    from inferopt.plugins.metrics.latency import LatencyMetric

    recipe = tmp_path / "r.toml"
    recipe.write_text("[gates]\naccuracy.max_accuracy_drop = 1.0\nmin_speedup = 1.1\n")
    assert make_recipe(recipe).gates.to_dict() == {"accuracy.max_accuracy_drop": 1.0,
                                                   "min_speedup": 1.1}
    installed = {"latency": LatencyMetric, "jitter": _Jitter}
    # only latency is measured: its min_speedup, though jitter (installed) offers one too
    check_gates({"min_speedup": 1.1}, offered_gates(installed), {"latency"}, installed)


def test_plots_complete_old_reports_from_the_installed_descriptions(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    from inferopt._plotting import _choose
    from inferopt.plugins.metrics.latency import LatencyMetric

    old = {"run_id": "a", "steps": [], "metrics": {"latency": {
        k: v for k, v in LatencyMetric.describe().items() if k != "aspect"}},
        "baseline": {"metrics": {"latency": {"p50_ms": 2.0}}},
        "optimized": {"metrics": {"latency": {"p50_ms": 1.0}}}}
    assert _choose([old], "speed", {}) is None
    assert _choose([old], "speed", _described(LatencyMetric)) == (
        "latency", "p50_ms", "latency p50 (ms)")
