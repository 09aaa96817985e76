"""Plots of runs: accuracy (or fidelity) against latency, and size. Needs matplotlib (the
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


def _quality(metrics: dict[str, Any]) -> tuple[float | None, str]:
    acc = metrics.get("accuracy", {}).get("top1")
    if isinstance(acc, int | float):
        return acc * 100, "top-1 accuracy (%)"
    agree = metrics.get("fidelity", {}).get("agreement")
    if isinstance(agree, int | float):
        return agree * 100, "top-1 agreement with baseline (%)"
    return None, ""


def plot_reports(reports: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write a PNG: left, quality against p50 latency (each run's baseline and optimized model
    joined by an arrow); right, saved size per run. ``reports`` are ``inferopt.report/1``
    documents."""
    # a Figure with its own Agg canvas: no pyplot, so the user's matplotlib backend (a
    # notebook's inline one) is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    ylabel = ""
    names, base_sizes, opt_sizes = [], [], []
    for report in reports:
        base = report["baseline"]["metrics"]
        opt = report["optimized"]["metrics"]
        name = ", ".join(s["name"] for s in report["steps"]) or "no steps"
        label = f"{report['run_id']}: {name}"
        lb, lo = base.get("latency", {}).get("p50_ms"), opt.get("latency", {}).get("p50_ms")
        (qb, ylabel_b), (qo, _) = _quality(base), _quality(opt)
        if lb is not None and lo is not None and qb is not None and qo is not None:
            ylabel = ylabel_b
            ax.annotate("", xy=(lo, qo), xytext=(lb, qb),
                        arrowprops={"arrowstyle": "->", "color": "0.6"})
            ax.scatter([lb], [qb], marker="s", color="0.4")
            ax.scatter([lo], [qo], label=label)
        names.append(label)
        base_sizes.append(base.get("size", {}).get("bytes", 0) / 1e6)
        opt_sizes.append(opt.get("size", {}).get("bytes", 0) / 1e6)
    ax.set_xlim(left=0)
    ax.set_xlabel("p50 latency per batch (ms); square: baseline")
    ax.set_ylabel(ylabel or "quality (no accuracy or fidelity measured)")
    ax.set_title("quality vs latency")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    positions = range(len(names))
    bx.barh([p + 0.2 for p in positions], base_sizes, height=0.4, color="0.7", label="baseline")
    bx.barh([p - 0.2 for p in positions], opt_sizes, height=0.4, label="optimized")
    bx.set_yticks(list(positions), [n[:40] for n in names], fontsize=7)
    bx.set_xlabel("saved weights (MB)")
    bx.set_title("size")
    bx.legend(fontsize=7)
    fig.suptitle(title or "inferopt")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

