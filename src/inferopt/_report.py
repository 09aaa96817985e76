"""The run report: one versioned JSON schema, rendered as a terminal table and as Markdown.

Every number in it was measured in this run; a comparison is only made between numbers
measured on the same harness, and the verdict never claims a speedup it did not measure.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import attrs

SCHEMA = "inferopt.report/1"



@attrs.define
class StepRecord:
    """One applied optimizer step."""

    index: int
    name: str
    options: dict[str, Any]
    plugin: str
    distribution: str
    version: str
    seconds: float = 0.0
    details: dict[str, Any] = attrs.field(factory=dict)
    warnings: list[str] = attrs.field(factory=list)
    state: dict[str, Any] = attrs.field(factory=dict)
    kind: str = ""
    failed: str | None = None  # why the step failed (--keep-going undid it and went on)
    optimizer_version: int = 1  # Optimizer.version, saved with the state (inferopt.json)
    # why the backend cannot run what this step produces (the step was skipped, not run)
    refused: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "options": self.options,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "seconds": round(self.seconds, 4),
            "kind": self.kind,
            "failed": self.failed,
            "refused": self.refused,
            "details": self.details,
            "warnings": self.warnings,
        }


@attrs.define
class Report:
    """A finished run. ``to_dict`` is the ``inferopt.report/1`` JSON document."""

    run_id: str
    created: str
    recipe: dict[str, Any]
    plugins: dict[str, dict[str, str]]
    baseline: dict[str, dict[str, Any]]
    optimized: dict[str, dict[str, Any]]
    steps: list[StepRecord]
    environment: dict[str, Any]
    comparisons: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    # file paths by name; "backend" holds the backend's own: role -> name -> path
    artifacts: dict[str, Any] = attrs.field(factory=dict)
    skipped_metrics: dict[str, str] = attrs.field(factory=dict)
    warnings: list[str] = attrs.field(factory=list)
    gates: list[dict[str, Any]] = attrs.field(factory=list)
    #: each metric's self-description (:meth:`inferopt.Metric.describe`): its quantities and
    #: gates, stored so that the report renders without the metric's plugin installed; the
    #: verdict and findings come from them (a metric without one: its numbers, unjudged)
    descriptions: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    # False in the other workers of a torchrun launch: only the main one prints and saves
    main_worker: bool = True
    # seconds the backend took to prepare (compile, export) each role's measured model, untimed
    prepare_seconds: dict[str, float] = attrs.field(factory=dict)

    @property
    def failed_steps(self) -> list[StepRecord]:
        """Steps that failed and were undone (runs with ``keep_going``)."""
        return [s for s in self.steps if s.failed]

    @property
    def comparison(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for metric, base in self.baseline.items():
            opt = self.optimized.get(metric, {})
            rows = {}
            for key, b in base.items():
                o = opt.get(key)
                if not _is_number(b) or not _is_number(o):
                    continue
                rows[key] = {"baseline": b, "optimized": o, "ratio": _ratio(o, b)}
            out[metric] = rows
        return out

    @property
    def verdict(self) -> dict[str, Any]:
        """What the run concludes, from the metrics' self-descriptions: the numbers their gates
        publish (latency's ``speedup``, size's ``size_ratio``, accuracy's
        ``accuracy_drop_points``...), each metric's judgement in its own words (``latency``:
        ``faster``), whether the gates passed, and findings with their likely causes."""
        from inferopt._quantities import judgement, reported_numbers

        v: dict[str, Any] = reported_numbers(self._descriptions(), self.baseline,
                                             self.optimized, self.comparisons)
        for metric, description in self._descriptions().items():
            judged = judgement(description, self.baseline.get(metric, {}),
                               self.optimized.get(metric, {}), self.comparisons.get(metric, {}))
            if judged is not None:
                v.setdefault(metric, judged[1])
        if self.gates:
            v["gates_passed"] = all(g["passed"] for g in self.gates)
        v["findings"] = _findings(self)
        return v

    def _descriptions(self) -> dict[str, dict[str, Any]]:
        """Every measured metric's self-description (a metric without one: its numbers)."""
        from inferopt._quantities import fallback_description

        return {m: self.descriptions.get(m) or fallback_description(m, self.optimized.get(m, {}))
                for m in dict.fromkeys([*self.baseline, *self.optimized, *self.comparisons])}

    def improvement(self, metric: str, field: str | None = None) -> tuple[float | None, str]:
        """How many times better the optimized model is than the baseline on ``field`` of
        ``metric`` (default: its primary quantity), and the judgement: ``better``, ``worse`` or
        ``same``, as the run's verdict makes it (a paired comparison's verdict for the primary
        quantity, else the change against the quantity's noise band, as the report's rows judge
        it). ``(None, "")`` when the quantity has no direction or was not measured in both
        runs; the times better is None when a value is not positive."""
        from inferopt._contract import Quantity
        from inferopt._quantities import _paired_judgement, judge

        description = self._descriptions().get(metric, {})
        field = field or description.get("primary") or ""
        q = Quantity.from_dict(description.get("quantities", {}).get(field, {}))
        comparison = self.comparisons.get(metric, {})
        paired = _paired_judgement(description, comparison)
        if field == description.get("primary") and paired and _is_number(comparison.get("speedup")):
            return float(comparison["speedup"]), paired
        b, o = self.baseline.get(metric, {}).get(field), self.optimized.get(metric, {}).get(field)
        if q.better not in ("lower", "higher") or not (_is_number(b) and _is_number(o)):
            return None, ""
        ratio = (b / o if q.better == "lower" else o / b) if b > 0 and o > 0 else None
        if field == description.get("primary") and paired:
            return ratio, paired
        # as the report's rows judge it: a metric measured in pairs has no unpaired noise band
        return ratio, judge(q.better, b, o, q.same_within,
                            0.0 if paired else q.same_within_relative, q.change)

    def judgements(self, aspect: str) -> list[str]:
        """``better``/``worse``/``same`` of each metric of ``aspect`` (``speed``, ``size``,
        ``quality``) that could be judged. Metrics measured in pairs (latency's interleaved
        A/B) are the fairer judges: when any metric of the aspect was, only those count."""
        from inferopt._quantities import is_paired, judgement

        judged: list[tuple[bool, str]] = []
        for metric, description in self._descriptions().items():
            if description.get("aspect") != aspect:
                continue
            comparison = self.comparisons.get(metric, {})
            found = judgement(description, self.baseline.get(metric, {}),
                              self.optimized.get(metric, {}), comparison)
            if found is not None:
                judged.append((is_paired(description, comparison), found[0]))
        paired_only = any(paired for paired, _ in judged)
        return [j for paired, j in judged if paired or not paired_only]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; non-finite numbers become null (JSON has no NaN)."""
        return finite_json({
            "schema": SCHEMA,
            "run_id": self.run_id,
            "created": self.created,
            "recipe": self.recipe,
            "plugins": self.plugins,
            "baseline": {"metrics": self.baseline},
            "optimized": {"metrics": self.optimized},
            "steps": [s.to_dict() for s in self.steps],
            "comparison": self.comparison,
            "metrics": self.descriptions,
            "paired": self.comparisons,
            "verdict": self.verdict,
            "gates": self.gates,
            "skipped_metrics": self.skipped_metrics,
            "warnings": self.warnings,
            "environment": self.environment,
            "prepare_seconds": {k: round(v, 4) for k, v in self.prepare_seconds.items()},
            "artifacts": self.artifacts,
        })

    # -- rendering ----------------------------------------------------------------------------

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(quantity, baseline, optimized, change, better) rows for the summary table: every
        shown quantity of every metric, as the metric describes it (a metric without a
        description: its numbers, unitless)."""
        from inferopt._quantities import fallback_description, metric_rows

        rows = []
        for metric in self.comparison:
            base = self.baseline.get(metric, {})
            opt = self.optimized.get(metric, {})
            description = self.descriptions.get(metric) or fallback_description(metric, opt)
            rows += [(r["label"], r["baseline"], r["optimized"], r["change"], r["better"])
                     for r in metric_rows(metric, description, base, opt,
                                          comparison=self.comparisons.get(metric))]
        return rows

    def verdict_lines(self) -> list[str]:
        from inferopt._quantities import metric_rows, paired_line

        v = self.verdict
        lines = []
        if self.recipe.get("baseline_backend"):
            lines.append(f"backends: the baseline ran on {self.recipe['baseline_backend']}, the "
                         f"optimized model on {self.recipe.get('backend')}")
        for metric in self.baseline:
            line = paired_line(metric, self.comparisons.get(metric, {}))
            if line is None:  # not measured in pairs: its primary quantity's judgement
                description = self.descriptions.get(metric, {})
                primary = description.get("primary")
                rows = [r for r in metric_rows(metric, {**description, "quantities": {
                    k: q for k, q in description.get("quantities", {}).items() if k == primary}},
                    self.baseline[metric], self.optimized.get(metric, {}), shown_only=False)
                    if r["better"]]
                if rows:
                    word = v.get(metric) if isinstance(v.get(metric), str) else rows[0]["better"]
                    line = f"{metric}: {word} ({rows[0]['label']} {rows[0]['change']})"
            if line:
                lines.append(line)
        for finding in v["findings"]:
            lines.append(f"{finding['finding']}: {finding['cause']}")
        for g in self.gates:
            state = "passed" if g["passed"] else "FAILED"
            op = ">=" if g.get("kind", g["name"]).startswith("min_") else "<="
            lines.append(f"gate {g['name']} {op} {g['threshold']}: {state} (got {g['value']})")
        return lines

    def render_console(self, console: Any) -> None:
        from rich.table import Table

        table = Table(title=f"inferopt run {self.run_id}: baseline vs optimized")
        table.add_column("metric")
        table.add_column("baseline", justify="right")
        table.add_column("optimized", justify="right")
        table.add_column("change", justify="right")
        table.add_column("better?")
        for row in self.rows():
            table.add_row(*row)
        console.print(table)
        steps = ", ".join(f"{s.name} ({_step_state(s)})" for s in self.steps) or "none"
        console.print(f"steps: {steps}")
        for s in self.steps:
            if s.details.get("summary"):
                console.print(f"  {s.name}: {s.details['summary']}", soft_wrap=True,
                              highlight=False)
        for line in self.verdict_lines():
            console.print(line)
        for name, reason in self.skipped_metrics.items():
            console.print(f"[yellow]metric {name} skipped:[/] {reason}", soft_wrap=True)
        for w in self.warnings:
            console.print(f"[yellow]warning:[/] {w}", markup=True, soft_wrap=True)
        if self.artifacts.get("dir"):
            console.print(f"saved: {self.artifacts['dir']}")

    def to_markdown(self) -> str:
        lines = [
            f"# inferopt run {self.run_id}",
            "",
            f"Model `{self.recipe.get('model')}`, data `{self.recipe.get('data')}`, "
            f"backend `{self.recipe.get('backend')}`, created {self.created}.",
            "",
            "| metric | baseline | optimized | change | better? |",
            "|---|---:|---:|---:|---|",
        ]
        lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in self.rows()]
        lines += ["", "## Steps", ""]
        for s in self.steps:
            lines.append(f"- `{s.name}` {s.options or ''} — "
                         + (f"FAILED and undone: {s.failed}" if s.failed
                            else f"skipped: {s.refused}" if s.refused
                            else f"{s.seconds:.2f} s"))
            if s.details.get("summary"):
                lines.append(f"  - {s.details['summary']}")
            for w in s.warnings:
                lines.append(f"  - warning: {w}")
        if not self.steps:
            lines.append("- none")
        lines += ["", "## Verdict", ""] + [f"- {line}" for line in self.verdict_lines()]
        env = self.environment
        lines += [
            "",
            "## Environment",
            "",
            *[f"- {k}: {v}" for k, v in env.items()],
            "",
        ]
        return "\n".join(lines)


def _findings(report: Report) -> list[dict[str, str]]:
    """Plain statements of what did not go as the steps promised, each with its likely cause.
    Speed, size and quality are the metrics' aspects (:attr:`inferopt.Metric.aspect`), so a
    third-party metric takes part as the built-in ones do."""
    out: list[dict[str, str]] = [
        {"finding": f"step {s.index} {s.name!r} failed and was undone", "cause": s.failed}
        for s in report.steps if s.failed]
    out += [{"finding": f"step {s.index} {s.name!r} skipped: the backend cannot run it",
             "cause": s.refused} for s in report.steps if s.refused]
    kinds = {s.kind for s in report.steps if not s.failed and not s.refused}
    speed, size = report.judgements("speed"), report.judgements("size")
    not_faster = bool(speed) and "better" not in speed
    if "worse" in speed:
        slow_warnings = [w for s in report.steps for w in s.warnings
                         if any(k in w for k in ("slower", "reference", "dequantiz"))]
        out.append({"finding": "slower than baseline", "cause": "; ".join(slow_warnings) or (
            "the optimized layers' kernels cost more than they save at this batch size and on "
            "this hardware; try a larger --batch-size, another kernel, or skip small layers")})
    if "pruning" in kinds and not_faster:
        unstructured = [s.name for s in report.steps
                        if s.kind == "pruning" and s.details.get("mode") == "unstructured"]
        out.append({"finding": "pruned but not faster", "cause": (
            f"{', '.join(unstructured)} zeroed single weights, which dense kernels multiply like "
            "any other; use prune-l1:structured=true or prune-activations to remove whole "
            "neurons") if unstructured else (
            "the pruned layers take too small a share of the run time at this batch size; "
            "prune more, or more layers")})
    if "quantization" in kinds and size and "better" not in size:
        out.append({"finding": "quantized but not smaller", "cause": (
            "no layer was quantized (see the step's skipped layers)") if not any(
            s.details.get("quantized") for s in report.steps if s.kind == "quantization") else (
            "the quantized layers hold a small share of the weights; the rest stayed in float")})
    descriptions = report._descriptions()
    for g in report.gates:
        metric = g.get("metric") or next(
            (m for m, d in descriptions.items() if g["name"] in d.get("gates", {})), None)
        if not g["passed"] and descriptions.get(metric, {}).get("aspect") == "quality":
            names = ", ".join(s.name for s in report.steps) or "no step"
            op = "<" if str(g.get("kind") or g["name"]).startswith("min_") else ">"
            out.append({"finding": "outside the accuracy budget", "cause": (
                f"{g['name']} {g['value']} {op} {g['threshold']} after {names}; try milder "
                "options (skip sensitive layers, lower sparsity, more calibration data) or "
                "fine-tuning")})
    return out


def _step_state(step: StepRecord) -> str:
    if step.failed:
        return "FAILED, undone"
    if step.refused:
        return "skipped: the backend cannot run it"
    return f"{step.seconds:.2f}s"


def finite_json(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def _is_number(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(o: float, b: float) -> float | None:
    return round(o / b, 4) if b else None
