"""inferopt compare on damaged or edited reports: one error naming the file and the field."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def one_run(cli):
    result = cli("run", "--model", "demo:digits-mlp-small", "--metric", "size", "--out", "a")
    assert result.returncode == 0, result.stderr
    return json.loads(open("a/report.json").read())


@pytest.mark.parametrize(("field", "value", "says"), [
    ("baseline", None, "field 'baseline' must be an object"),
    ("optimized", [], "field 'optimized' must be an object"),
    ("steps", None, "field 'steps' must be a list"),
    ("comparisons", [1], "field 'comparisons' must be an object"),
])
def test_a_damaged_report_is_one_error_not_a_traceback(cli, one_run, field, value, says):
    damaged = dict(one_run, **{field: value})
    with open("damaged.json", "w") as handle:
        json.dump(damaged, handle)
    result = cli("compare", "a", "damaged.json")
    assert result.returncode == 2
    assert "damaged.json" in result.stderr and says in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1


def test_two_good_runs_compare(cli, one_run):
    assert cli("compare", "a", "a/report.json").returncode == 0
