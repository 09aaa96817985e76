"""A metric's bad value costs that metric, never the run (issue: reliability, case 5)."""

from __future__ import annotations

import json

import pytest

BAD_METRICS = '''
import math
import attrs
import inferopt


@attrs.frozen
class Returns(inferopt.Metric):
    name = "returns"
    primary = "value"
    kind: str = inferopt.option("object", choices=("object", "list", "nan"))

    def measure(self, model, backend, data, ctx):
        if self.kind == "object":
            return {"value": object()}
        if self.kind == "list":
            return [1.0, 2.0]
        return {"value": math.nan, "other": 1.0}


@inferopt.hookimpl
def inferopt_register_metrics(register):
    register(Returns)
'''


@pytest.mark.parametrize(("kind", "says"), [("object", "of type object, which a JSON report"),
                                            ("list", "returned a list, not a dict")])
def test_a_metric_returning_what_json_cannot_hold_is_skipped_by_name(cli, plugin_env, kind,
                                                                      says):
    env = plugin_env("inferopt-returns", {"returns": "returns_plugin"},
                     {"returns_plugin": BAD_METRICS})
    result = cli("run", "--model", "demo:digits-mlp-small", "--metric", "size", "--metric",
                 f"returns:kind={kind}", "--out", "run", env=env)
    assert result.returncode == 0, result.stderr  # the run and its other results are kept
    report = json.loads(open("run/report.json").read())
    assert "size" in report["optimized"]["metrics"]
    assert "returns" not in report["optimized"]["metrics"]
    warning = next(w for w in report["warnings"] if "plugin 'returns'" in w)
    assert "plugin 'returns'" in warning and says in warning


def test_a_nan_value_is_kept_as_null_and_said(cli, plugin_env):
    env = plugin_env("inferopt-returns", {"returns": "returns_plugin"},
                     {"returns_plugin": BAD_METRICS})
    result = cli("run", "--model", "demo:digits-mlp-small", "--metric", "fidelity", "--metric",
                 "returns:kind=nan",
                 "--out", "run", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["optimized"]["metrics"]["returns"]["value"] is None
    assert report["optimized"]["metrics"]["returns"]["other"] == 1.0
    assert any("gave NaN for value" in w for w in report["warnings"])
    assert not any("snr" in w for w in report["warnings"])  # inf SNR of a model vs itself
