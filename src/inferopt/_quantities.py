"""Metrics' self-descriptions at work: showing a quantity's values and change, judging better or
worse, and checking gates — for any metric, from the descriptions a report stores
(:meth:`inferopt.Metric.describe`), so nothing here names a metric.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, TypeGuard

from inferopt._contract import Gate, Quantity
from inferopt._errors import UsageError


def is_number(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# --- values --------------------------------------------------------------------------------


def format_value(x: float, unit: str) -> str:
    """``x`` with its unit, readably: bytes in kB/MB/GB, fractions as percentages."""
    if unit == "bytes":
        for prefix, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if x >= size:
                return f"{x / size:.2f} {prefix}"
        return f"{int(x)} B"
    if unit == "fraction":
        return f"{x * 100:.2f}%"
    if unit == "ms":
        return f"{x:.3f} ms"
    if unit == "samples/s":
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
    if unit == "count":
        for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(x) >= size:
                return f"{x / size:.2f}{prefix}"
        return f"{x:.0f}"
    return f"{x:.4g} {unit}".rstrip()


def change_value(kind: str | None, b: float, o: float) -> float | None:
    """The change from ``b`` to ``o`` as a number of its kind (``percent`` is the ratio)."""
    if kind == "speedup":
        return b / o if o and b else None
    if kind in ("ratio", "percent"):
        return o / b if b else None
    if kind == "points":
        return (o - b) * 100 + 0.0
    if kind == "difference":
        return o - b + 0.0
    return None


def format_change(kind: str | None, b: float, o: float) -> str:
    value = change_value(kind, b, o)
    if value is None:
        return "-"
    if kind == "speedup":
        return f"x{value:.2f} faster" if o <= b else f"x{o / b:.2f} slower"
    if kind == "ratio":
        return f"x{value:.2f}"
    if kind == "percent":
        return f"{value * 100:.1f}%"
    if kind == "points":
        return f"{value:+.2f} pts"
    return f"{value:+.3g}"


def judge(better: str | None, b: float, o: float, same_within: float = 0.0,
          same_within_relative: float = 0.0, change: str | None = None) -> str:
    """``better``, ``worse`` or ``same`` for a quantity with a direction; "" without one.
    A change of at most ``same_within`` (absolute) is "same"; so is one within
    ``same_within_relative`` of no change: a speedup or ratio within 1 ± it (latency's 0.05:
    x0.95 to x1.05), any other kind of change ``|o - b| <= same_within_relative * |b|``."""
    if better not in ("lower", "higher"):
        return ""
    if math.isclose(o, b, rel_tol=1e-9, abs_tol=same_within):
        return "same"
    if same_within_relative > 0:
        value = change_value(change, b, o) if change in ("speedup", "ratio", "percent") else None
        if value is not None:
            if abs(value - 1.0) <= same_within_relative:
                return "same"
        elif abs(o - b) <= same_within_relative * abs(b):
            return "same"
    return "better" if (o < b) == (better == "lower") else "worse"


# --- descriptions --------------------------------------------------------------------------


def quantities_of(description: dict[str, Any], *results: dict[str, Any]
                  ) -> list[tuple[str, Quantity, str]]:
    """(field, quantity, label) for each described field present in ``results``; a field name
    ending in ``*`` describes every field it prefixes, ``{}`` in its label being the rest."""
    out = []
    present = [k for r in results for k in r]
    for pattern, doc in description.get("quantities", {}).items():
        q = Quantity.from_dict(doc)
        if pattern.endswith("*"):
            for key in dict.fromkeys(k for k in present if fnmatch.fnmatchcase(k, pattern)):
                rest = key[len(pattern) - 1:]
                out.append((key, q, q.label.replace("{}", rest) if q.label else key))
        else:
            out.append((pattern, q, q.label or f"{description.get('name', '')} {pattern}".strip()))
    return out


def fallback_description(metric: str, result: dict[str, Any]) -> dict[str, Any]:
    """For a report from before metrics described themselves: every number, unitless."""
    return {"name": metric, "primary": "", "gates": {}, "quantities": {
        k: Quantity(change="difference").to_dict() for k, v in result.items() if is_number(v)}}


def metric_rows(metric: str, description: dict[str, Any], base: dict[str, Any],
                opt: dict[str, Any], shown_only: bool = True,
                comparison: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """One row per (shown) quantity: label (``name`` with a mark when it rests on few runs),
    baseline, optimized, change, better (or ""). With a paired ``comparison`` whose verdict
    judges the primary quantity, that row says what the verdict says, and the other rows
    drop the unpaired noise band."""
    paired = _paired_judgement(description, comparison or {})
    rows = []
    unreliable = set(base.get("unreliable", ())) | set(opt.get("unreliable", ()))
    for key, q, label in quantities_of({"name": metric, **description}, base, opt):
        if shown_only and not q.show:
            continue
        b, o = base.get(key), opt.get(key)
        if not is_number(o):
            continue
        name = label
        if key in unreliable or key.rsplit("_", 1)[0] in unreliable:
            label += " (few runs)"  # a tail percentile that rests on too few runs
        if not is_number(b):  # e.g. the baseline's SNR against itself is infinite
            rows.append({"label": label, "name": name, "baseline": "-",
                         "optimized": format_value(o, q.unit), "change": "-", "better": ""})
            continue
        if paired is not None and key == description.get("primary"):
            better = paired
        else:
            better = judge(q.better, b, o, q.same_within,
                           0.0 if paired is not None else q.same_within_relative, q.change)
        rows.append({"label": label, "name": name, "baseline": format_value(b, q.unit),
                     "optimized": format_value(o, q.unit), "change": format_change(q.change, b, o),
                     "better": better})
    return rows


JUDGEMENTS = ("better", "worse", "same")


def judgement(description: dict[str, Any], base: dict[str, Any], opt: dict[str, Any],
              comparison: dict[str, Any]) -> tuple[str, str] | None:
    """A metric's overall judgement, ``better``/``worse``/``same``, with the word its primary
    quantity uses for it (latency: ``faster``...): from its paired comparison's verdict when it
    has one (:meth:`~inferopt.Metric.measure_pair`), else from its primary quantity's change.
    None when neither says."""
    primary = description.get("primary") or ""
    q = Quantity.from_dict(description.get("quantities", {}).get(primary, {}))
    paired = _paired_judgement(description, comparison)
    if paired is not None:
        return paired, comparison["verdict"]
    b, o = base.get(primary), opt.get(primary)
    if not is_number(b) or not is_number(o):
        return None
    j = judge(q.better, b, o, q.same_within, q.same_within_relative, q.change)
    return (j, q.words[JUDGEMENTS.index(j)]) if j else None


def _paired_judgement(description: dict[str, Any], comparison: dict[str, Any]) -> str | None:
    """``better``/``worse``/``same`` from a paired comparison's verdict, when it is one of the
    primary quantity's words (a verdict in other words: None, judge the numbers instead)."""
    verdict = comparison.get("verdict")
    q = Quantity.from_dict(description.get("quantities", {}).get(
        description.get("primary") or "", {}))
    if isinstance(verdict, str) and verdict in q.words:
        return JUDGEMENTS[q.words.index(verdict)]
    return None


def is_paired(description: dict[str, Any], comparison: dict[str, Any]) -> bool:
    """Whether a paired comparison judged this metric (its verdict in the metric's words)."""
    return _paired_judgement(description, comparison) is not None


def reported_numbers(descriptions: dict[str, dict[str, Any]],
                     baseline: dict[str, dict[str, Any]], optimized: dict[str, dict[str, Any]],
                     comparisons: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers of every gate a metric publishes (:attr:`~inferopt.Gate.reported_as`), set
    or not, by their published name; a number from a paired comparison with a confidence
    interval brings ``NAME_ci`` and ``NAME_confidence``."""
    out: dict[str, Any] = {}
    for metric, description in descriptions.items():
        for doc in description.get("gates", {}).values():
            gate = Gate.from_dict(doc)
            if not gate.reported_as:
                continue
            q = Quantity.from_dict(description.get("quantities", {}).get(gate.quantity, {}))
            comparison = comparisons.get(metric, {})
            value = gate_number(gate, q, baseline.get(metric, {}).get(gate.quantity),
                                optimized.get(metric, {}).get(gate.quantity), comparison)
            if value is None or not math.isfinite(value):
                continue
            out[gate.reported_as] = round(value, 4) + 0.0
            if (gate.comparison and is_number(comparison.get(gate.comparison))
                    and is_number(comparison.get("ci_low"))
                    and is_number(comparison.get("ci_high"))):
                out[f"{gate.reported_as}_ci"] = [round(comparison["ci_low"], 3),
                                                 round(comparison["ci_high"], 3)]
                out[f"{gate.reported_as}_confidence"] = comparison.get("confidence")
    return out


def paired_line(metric: str, comparison: dict[str, Any]) -> str | None:
    """A metric's paired verdict (its :meth:`~inferopt.Metric.measure_pair` comparison) in one
    line: the verdict, the change with its confidence interval when it has one."""
    verdict = comparison.get("verdict")
    if not verdict:
        return None
    number = next((k for k in ("speedup", "ratio", "change") if is_number(comparison.get(k))),
                  None)
    if number is None:
        return f"{metric}: {verdict}"
    detail = f"{number} x{comparison[number]:.2f}"
    if is_number(comparison.get("ci_low")) and is_number(comparison.get("ci_high")):
        level = round((comparison.get("confidence") or 0.95) * 100)
        detail += (f", {level}% CI x{comparison['ci_low']:.2f}-x{comparison['ci_high']:.2f}")
    if comparison.get("method"):
        detail += f", {str(comparison['method']).split(';')[0]}"
    return f"{metric}: {verdict} ({detail})"


# --- gates ---------------------------------------------------------------------------------


def offered_gates(metric_classes: dict[str, Any]) -> dict[str, tuple[str, Gate]]:
    """gate name -> (metric name, gate) over the given metric classes, by metric name; every
    gate also under ``METRIC.GATE``. A name two metrics offer is kept only qualified."""
    out: dict[str, tuple[str, Gate]] = {}
    ambiguous: set[str] = set()
    for metric, cls in metric_classes.items():
        for name, gate in getattr(cls, "gates", {}).items():
            out[f"{metric}.{name}"] = (metric, gate)
            if name in out and out[name][0] != metric:
                ambiguous.add(name)
            out.setdefault(name, (metric, gate))
    for name in ambiguous:
        del out[name]
    return out


def _offered_by(name: str, metric_classes: dict[str, Any]) -> list[str]:
    return [m for m, cls in metric_classes.items() if name in getattr(cls, "gates", {})]


def check_gates(thresholds: dict[str, float], offered: dict[str, tuple[str, Gate]],
                run_metrics: set[str], metric_classes: dict[str, Any] | None = None) -> None:
    """Every gate asked for is one an installed metric offers, and that metric is measured.
    A name several installed metrics offer resolves to the one the run measures; when the run
    measures several, it must be qualified (``METRIC.GATE``)."""
    metric_classes = metric_classes or {}
    unknown = sorted(n for n in thresholds
                     if n not in offered and not _offered_by(n, metric_classes))
    if unknown:
        known = ", ".join(f"{name} ({metric})" for name, (metric, _g) in sorted(offered.items())
                          if "." not in name)
        raise UsageError(f"unknown gate(s) {', '.join(unknown)}; the installed metrics offer: "
                         f"{known or 'none'}")
    for name in thresholds:
        if name in offered:
            owners = [offered[name][0]]
        else:
            owners = _offered_by(name, metric_classes)
            in_run = [m for m in owners if m in run_metrics]
            if len(in_run) > 1 or not in_run:
                raise UsageError(
                    f"gate {name} is offered by several metrics ({', '.join(owners)}); name "
                    "one: " + " or ".join(f"{m}.{name}" for m in (in_run or owners)))
            owners = in_run
        if owners[0] not in run_metrics:
            raise UsageError(f"gate {name} needs the {owners[0]!r} metric; add --metric "
                             f"{owners[0]}")


def find_gate(name: str, descriptions: dict[str, dict[str, Any]]
              ) -> tuple[str, dict[str, Any]]:
    """(metric, gate document) of gate ``name`` (or ``METRIC.GATE``) among ``descriptions``."""
    metric, _, gate = name.rpartition(".")
    if metric in descriptions and gate in descriptions[metric].get("gates", {}):
        return metric, descriptions[metric]["gates"][gate]
    found = [(m, d["gates"][name]) for m, d in descriptions.items()
             if name in d.get("gates", {})]
    if not found:
        raise UsageError(f"gate {name}: no metric of this run offers it")
    if len(found) > 1:
        raise UsageError(f"gate {name} is offered by several metrics "
                         f"({', '.join(m for m, _ in found)}); name one as METRIC.{name}")
    return found[0]


def gate_number(gate: Gate, quantity: Quantity, b: Any, o: Any,
                comparison: dict[str, Any]) -> float | None:
    """The number ``gate`` bounds, or None when it was not measured."""
    if gate.comparison and is_number(comparison.get(gate.comparison)):
        return float(comparison[gate.comparison])
    on = gate.kind.split("_", 1)[1]
    if on == "value":
        return float(o) if is_number(o) else None
    if not is_number(b) or not is_number(o):
        return None
    if on == "change":
        return change_value(quantity.change, b, o)
    sign = -1.0 if quantity.better == "higher" else 1.0  # how much worse, not how much better
    if on == "drop":
        scale = 100.0 if quantity.change == "points" else 1.0
        return sign * (o - b) * scale + 0.0
    return sign * (o - b) / b * 100 + 0.0 if b > 0 else 0.0  # relative_drop


def evaluate_gates(thresholds: dict[str, float], descriptions: dict[str, dict[str, Any]],
                   baseline: dict[str, dict[str, Any]], optimized: dict[str, dict[str, Any]],
                   comparisons: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per gate asked for: name, threshold, value, passed, and what it checks."""
    records = []
    for name, threshold in thresholds.items():
        metric, doc = find_gate(name, descriptions)
        gate = Gate.from_dict(doc)
        qdoc = descriptions[metric].get("quantities", {}).get(gate.quantity, {})
        value = gate_number(gate, Quantity.from_dict(qdoc),
                            baseline.get(metric, {}).get(gate.quantity),
                            optimized.get(metric, {}).get(gate.quantity),
                            comparisons.get(metric, {}))
        if value is None:
            raise UsageError(f"gate {name} needs the {metric!r} metric's {gate.quantity} on "
                             f"both models, and it was not measured (skipped metric or data "
                             "without what it needs)")
        value = round(value, 4) + 0.0
        passed = value >= threshold if gate.kind.startswith("min_") else value <= threshold
        records.append({"name": name, "threshold": threshold, "value": value,
                        "passed": passed, "metric": metric, "quantity": gate.quantity,
                        "kind": gate.kind})
    return records


def report_rows(docs: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """For each ``inferopt.report/1`` document, its rows (:func:`metric_rows`, with a
    ``metric`` key), from the descriptions the reports store; a report from before metrics
    described themselves borrows another report's description of the same metric."""
    known: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for metric, description in (doc.get("metrics") or {}).items():
            known.setdefault(metric, description)
    out = []
    for doc in docs:
        base, opt = doc["baseline"]["metrics"], doc["optimized"]["metrics"]
        rows = []
        for metric in base:
            description = ((doc.get("metrics") or {}).get(metric) or known.get(metric)
                           or fallback_description(metric, opt.get(metric, {})))
            rows += [{"metric": metric, **r} for r in metric_rows(
                metric, description, base[metric], opt.get(metric, {}))]
        out.append(rows)
    return out
