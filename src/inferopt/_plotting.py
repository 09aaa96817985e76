"""Plots of runs: quality against speed, and size (by the metrics' aspects). Needs matplotlib (the
``inferopt[plot]`` extra); callers check :func:`available` first."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _description(report: dict[str, Any], metric: str,
                 known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's own description of ``metric``, completed from ``known`` (the installed
    metric's, or another report's) where it lacks a field (reports from before aspects)."""
    own = (report.get("metrics") or {}).get(metric) or {}
    return {**known.get(metric, {}), **{k: v for k, v in own.items() if v is not None}}


def _choose(reports: list[dict[str, Any]], aspect: str,
            known: dict[str, dict[str, Any]]) -> tuple[str, str, str] | None:
    """(metric, primary field, axis label) of the ``aspect`` metric to plot for all runs: the
    first one measured on both models by the most runs."""
    counts: dict[tuple[str, str, str], int] = {}
    for report in reports:
        base, opt = report["baseline"]["metrics"], report["optimized"]["metrics"]
        for metric in base:
            description = _description(report, metric, known)
            field = description.get("primary")
            if description.get("aspect") != aspect or not field:
                continue
            if isinstance(base[metric].get(field), int | float) and isinstance(
                    opt.get(metric, {}).get(field), int | float):
                q = description.get("quantities", {}).get(field, {})
                unit = q.get("unit") or ""
                label = q.get("label") or f"{metric} {field}"
                shown = {"fraction": "%", "bytes": "MB"}.get(unit, unit)
                if shown and not label.endswith(f"({shown})"):
                    label = f"{label} ({shown})"
                key = (metric, field, label)
                counts[key] = counts.get(key, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def _value(metrics: dict[str, Any], found: tuple[str, str, str] | None, report: dict[str, Any],
           known: dict[str, dict[str, Any]]) -> float | None:
    if found is None:
        return None
    metric, field, _ = found
    x = metrics.get(metric, {}).get(field)
    if not isinstance(x, int | float):
        return None
    unit = _description(report, metric, known).get("quantities", {}).get(field, {}).get("unit")
    return x * 100 if unit == "fraction" else x / 1e6 if unit == "bytes" else float(x)


def plot_reports(reports: list[dict[str, Any]], path: Path, title: str = "",
                 descriptions: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a PNG: left, quality against speed (each run's baseline and optimized model
    joined by an arrow); right, size per run. Which metrics those are comes from their
    aspects (:attr:`inferopt.Metric.aspect`): of each aspect, the metric most runs measured.
    ``reports`` are ``inferopt.report/1`` documents; ``descriptions`` (metric name ->
    :meth:`~inferopt.Metric.describe`, e.g. the installed metrics') complete reports written
    before metrics declared aspects."""
    # a Figure with its own Agg canvas: no pyplot, so the user's matplotlib backend (a
    # notebook's inline one) is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    known: dict[str, dict[str, Any]] = {}
    for report in reports:
        for metric, description in (report.get("metrics") or {}).items():
            if description.get("aspect") is not None:
                known.setdefault(metric, description)
    for metric, description in (descriptions or {}).items():
        known.setdefault(metric, description)
    speed, quality, size = (_choose(reports, a, known) for a in ("speed", "quality", "size"))
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    names, base_sizes, opt_sizes = [], [], []
    for report in reports:
        base = report["baseline"]["metrics"]
        opt = report["optimized"]["metrics"]
        name = ", ".join(s["name"] for s in report["steps"]) or "no steps"
        label = f"{report['run_id']}: {name}"
        xb, xo = _value(base, speed, report, known), _value(opt, speed, report, known)
        qb, qo = _value(base, quality, report, known), _value(opt, quality, report, known)
        if None not in (xb, xo, qb, qo):
            ax.annotate("", xy=(xo, qo), xytext=(xb, qb),
                        arrowprops={"arrowstyle": "->", "color": "0.6"})
            ax.scatter([xb], [qb], marker="s", color="0.4")
            ax.scatter([xo], [qo], label=label)
        names.append(label)
        base_sizes.append(_value(base, size, report, known) or 0.0)
        opt_sizes.append(_value(opt, size, report, known) or 0.0)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"{speed[2] if speed else 'speed (none measured)'}; square: baseline")
    ax.set_ylabel(quality[2] if quality else "quality (none measured)")
    ax.set_title("quality vs speed")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    positions = range(len(names))
    bx.barh([p + 0.2 for p in positions], base_sizes, height=0.4, color="0.7", label="baseline")
    bx.barh([p - 0.2 for p in positions], opt_sizes, height=0.4, label="optimized")
    bx.set_yticks(list(positions), [n[:40] for n in names], fontsize=7)
    bx.set_xlabel(size[2] if size else "size (none measured)")
    bx.set_title("size")
    bx.legend(fontsize=7)
    fig.suptitle(title or "inferopt")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

