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


def _aspect(report: dict[str, Any], aspect: str, known: dict[str, dict[str, Any]]
            ) -> tuple[str, str, str] | None:
    """(metric, primary field, axis label) of the first metric of ``aspect`` the report
    measured on both models, from the metrics' self-descriptions."""
    base, opt = report["baseline"]["metrics"], report["optimized"]["metrics"]
    for metric in base:
        description = (report.get("metrics") or {}).get(metric) or known.get(metric) or {}
        field = description.get("primary")
        if description.get("aspect") != aspect or not field:
            continue
        if isinstance(base[metric].get(field), int | float) and isinstance(
                opt.get(metric, {}).get(field), int | float):
            q = description.get("quantities", {}).get(field, {})
            unit = q.get("unit") or ""
            label = q.get("label") or f"{metric} {field}"
            shown = {"fraction": "%", "bytes": "MB"}.get(unit, unit)
            return metric, field, f"{label} ({shown})".replace(" ()", "")
    return None


def _value(metrics: dict[str, Any], found: tuple[str, str, str], report: dict[str, Any],
           known: dict[str, dict[str, Any]]) -> float:
    metric, field, _ = found
    x = float(metrics[metric][field])
    description = (report.get("metrics") or {}).get(metric) or known.get(metric) or {}
    unit = description.get("quantities", {}).get(field, {}).get("unit")
    return x * 100 if unit == "fraction" else x / 1e6 if unit == "bytes" else x


def plot_reports(reports: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write a PNG: left, quality against speed (each run's baseline and optimized model
    joined by an arrow); right, size per run. Which metrics those are comes from their
    aspects (:attr:`inferopt.Metric.aspect`): the first ``quality``, ``speed`` and ``size``
    metric each run measured. ``reports`` are ``inferopt.report/1`` documents."""
    # a Figure with its own Agg canvas: no pyplot, so the user's matplotlib backend (a
    # notebook's inline one) is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    known: dict[str, dict[str, Any]] = {}
    for report in reports:
        for metric, description in (report.get("metrics") or {}).items():
            known.setdefault(metric, description)
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    xlabel = ylabel = size_label = ""
    names, base_sizes, opt_sizes = [], [], []
    for report in reports:
        base = report["baseline"]["metrics"]
        opt = report["optimized"]["metrics"]
        name = ", ".join(s["name"] for s in report["steps"]) or "no steps"
        label = f"{report['run_id']}: {name}"
        speed, quality = _aspect(report, "speed", known), _aspect(report, "quality", known)
        if speed and quality:
            xlabel, ylabel = speed[2], quality[2]
            xb, xo = _value(base, speed, report, known), _value(opt, speed, report, known)
            qb, qo = _value(base, quality, report, known), _value(opt, quality, report, known)
            ax.annotate("", xy=(xo, qo), xytext=(xb, qb),
                        arrowprops={"arrowstyle": "->", "color": "0.6"})
            ax.scatter([xb], [qb], marker="s", color="0.4")
            ax.scatter([xo], [qo], label=label)
        names.append(label)
        size = _aspect(report, "size", known)
        if size:
            size_label = size[2]
        base_sizes.append(_value(base, size, report, known) if size else 0.0)
        opt_sizes.append(_value(opt, size, report, known) if size else 0.0)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"{xlabel or 'speed (none measured)'}; square: baseline")
    ax.set_ylabel(ylabel or "quality (none measured)")
    ax.set_title("quality vs speed")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    positions = range(len(names))
    bx.barh([p + 0.2 for p in positions], base_sizes, height=0.4, color="0.7", label="baseline")
    bx.barh([p - 0.2 for p in positions], opt_sizes, height=0.4, label="optimized")
    bx.set_yticks(list(positions), [n[:40] for n in names], fontsize=7)
    bx.set_xlabel(size_label or "size (none measured)")
    bx.set_title("size")
    bx.legend(fontsize=7)
    fig.suptitle(title or "inferopt")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_tune(doc: dict[str, Any], path: Path) -> Path:
    """Write a PNG of an ``inferopt.tune/1`` search: speedup and size against the accuracy
    drop for every trial, the Pareto front joined, the budget as a line, the choice starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    relative = doc["settings"]["relative"]
    key = "accuracy_drop_percent" if relative else "accuracy_drop_points"
    unit = "% of baseline" if relative else "points"
    trials = [t for t in doc["trials"] if t["status"] == "ok" and t.get(key) is not None]
    front = set(doc["pareto"])
    fig = Figure(figsize=(11, 4.2))  # no pyplot: the user's matplotlib backend stays as it is
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, field, label in ((axes[0], "speedup", "p50 speedup vs baseline (interleaved A/B)"),
                             (axes[1], "size_ratio", "saved size / baseline")):
        shown = [t for t in trials if t.get(field) is not None]
        ax.scatter([t[key] for t in shown], [t[field] for t in shown], color="0.6", s=18,
                   label="trial")
        on_front = sorted((t for t in shown if t["id"] in front), key=lambda t: t[key])
        ax.plot([t[key] for t in on_front], [t[field] for t in on_front], "o-", color="C0",
                label="Pareto front")
        chosen = [t for t in shown if t["id"] == doc.get("chosen")]
        if chosen:
            ax.scatter([chosen[0][key]], [chosen[0][field]], marker="*", s=220, color="C3",
                       zorder=5, label=f"chosen: {chosen[0]['key'][:40]}")
        ax.axvline(doc["settings"]["max_accuracy_drop"], color="C3", linestyle="--",
                   linewidth=1, label="accuracy budget")
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.set_xlabel(f"accuracy drop ({unit})")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"inferopt tune: {doc['settings']['model']} ({len(doc['trials'])} trials, "
                 f"objective {doc['settings']['objective']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
