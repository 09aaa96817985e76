"""What a tune found, from its study: the ``inferopt.tune/2`` document, the table, Markdown, the
Optuna plots, and the chosen model saved under ``OUT/best``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from inferopt.plugins.commands.tune.search import (
    SCHEMA,
    Goal,
    done,
    is_candidate,
    num,
    speedup_text,
)
from inferopt.utils import finite_json, markdown_table, print_table


def document(worker: Any, settings: dict[str, Any], study: str, out: Path) -> dict[str, Any]:
    """The summary of every trial in the study, whichever worker ran it."""
    goal: Goal = worker.goal
    trials = sorted(worker.trials(), key=lambda t: t["number"])
    measured = [t for t in trials if done(t)]  # never a skipped one
    rows = [{**{k: v for k, v in t.items() if k not in ("report", "machine", "state", "number")},
             "id": t["number"], "within_budget": goal.within(t), "meets_goal": goal.meets(t),
             "objective": t.get("objective"), "replayed": t["number"] not in worker.mine}
            for t in measured if t["phase"] != "sensitivity"]
    chosen = max((r for r in rows if r["meets_goal"]),
                 key=lambda t: (t["objective"] or 0.0, -(goal.drop(t) or 0.0),
                                -(t.get("size_ratio") or 1.0), -t["id"]), default=None)
    closest = [] if chosen is not None else sorted(
        (r for r in rows if r["status"] == "ok" and is_candidate(r)),
        key=lambda t: (goal.excess(t), not t["improves"], -(t["objective"] or 0.0)))[:3]
    worker.plan(trials)  # its decisions on the pairs, for the record
    base = next((t for t in measured if t["phase"] == "baseline"), {})
    metrics = base["report"]["baseline"]["metrics"] if base.get("status") == "ok" else None
    return {
        "schema": SCHEMA, "settings": settings,
        "fingerprint": worker.study.user_attrs["fingerprint"], "goal": goal.text(),
        "stopped": worker.stopped, "space": [t.to_json() for t in worker.space],
        "baseline": {} if metrics is None else {
            "accuracy": metrics.get("accuracy", {}).get("top1"),
            "size_bytes": metrics.get("size", {}).get("bytes"),
            "latency_p50_ms": metrics.get("latency", {}).get("p50_ms"),
            "a_a_speedup": base.get("speedup"), "a_a_speedup_ci": base.get("speedup_ci"),
            "environment": worker.study.user_attrs.get("machine") or {}},
        "trials": rows,
        "sensitivity": [{k: t.get(k) for k in ("key", "of", "layer", "status", "error",
                                               "accuracy_drop_points", "accuracy_drop_percent",
                                               "cosine_drop")}
                        for t in measured if t["phase"] == "sensitivity"],
        "decisions": worker.decisions,
        "pareto": sorted(t.number for t in worker.study.best_trials
                         if t.number in {r["id"] for r in rows}),
        "chosen": chosen["id"] if chosen is not None else None,
        "closest": [t["id"] for t in closest],
        "artifacts": {"dir": str(out), "summary": str(out / "tune.json"),
                      "markdown": str(out / "tune.md"), "study": study,
                      "study_name": worker.study.study_name},
    }


def finish(worker: Any, settings: dict[str, Any], study: str, notes: list[str], out: Path,
           save: Any) -> dict[str, Any]:
    """Write the summary, the plots and ``OUT/best``. Workers sharing ``--out`` take turns
    (a file lock); the last one's summary includes every trial."""
    with (out / ".tune.lock").open("a") as lock:
        with contextlib.suppress(ImportError):  # no fcntl (Windows): one worker per --out
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        doc = document(worker, settings, study, out)
        chosen = next((t for t in doc["trials"] if t["id"] == doc["chosen"]), None)
        marker, best = out / ".best-trial", out / "best"
        if chosen is not None:
            stamp = f"{doc['fingerprint']}:{chosen['id']}"
            if not (marker.is_file() and marker.read_text() == stamp and best.is_dir()):
                report = save(chosen)
                marker.write_text(stamp)
                doc["best_run"] = {"run_id": report.run_id, "verdict": report.verdict,
                                   "gates": report.gates}
            doc["artifacts"]["best"] = str(best)
        elif best.is_dir():
            # an earlier choice this search does not confirm must not pass for its result;
            # renamed first, so that a kill never leaves half of it as best/ (what a killed
            # worker left under that name is removed first: the lock is ours)
            for old in out.glob(".best.discarded-*"):
                remove(old)
            remove(best.rename(out / f".best.discarded-{os.getpid()}"))
            marker.unlink(missing_ok=True)
            worker.echo(f"removed {best}: no candidate meets this goal")
        doc["notes"] = notes + plots(worker, out, doc)
        for name, text in (("tune.json", json.dumps(finite_json(doc), indent=2) + "\n"),
                           ("tune.md", to_markdown(doc))):
            # through a temporary file and a rename: an interruption never leaves half a file
            tmp = out / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)
    return doc


def remove(path: Path) -> None:
    """A file, or a directory with its contents; a symbolic link is removed, never followed."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def plots(worker: Any, out: Path, doc: dict[str, Any]) -> list[str]:
    """The Pareto front and the options' importance, drawn by Optuna with matplotlib."""
    try:
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import plot_param_importances, plot_pareto_front
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install 'inferopt[plot]')"]
    notes, study = [], worker.study
    size = ["size ratio"] if len(worker.directions) == 3 else []
    names = [f"{doc['settings']['objective']} (x better than the baseline)", *size,
             f"{worker.goal.quality} drop"]
    sampled = [t for t in study.get_trials(deepcopy=False) if t.params and t.values]
    for path, draw, enough in (
            ("pareto.png", lambda: plot_pareto_front(study, target_names=names),
             bool(doc["trials"])),
            ("importance.png", lambda: plot_param_importances(
                study, target=lambda t: t.values[0], target_name=names[0]), len(sampled) > 1)):
        if not enough:
            notes.append(f"{path} not drawn: needs more than one completed trial with options")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            axes.figure.savefig(out / path, dpi=110, bbox_inches="tight")
            plt.close(axes.figure)
            doc["artifacts"][path.split(".")[0]] = str(out / path)
        except Exception as exc:  # a plotting problem must not lose the search
            notes.append(f"{path} not drawn: {type(exc).__name__}: {exc}")
    return notes


def goal_of(doc: dict[str, Any]) -> Goal:
    s = doc["settings"]
    return Goal(s["objective"], s["max_accuracy_drop"], s["relative"], s.get("quality", "accuracy"))


def columns(doc: dict[str, Any]) -> tuple[str, ...]:
    """The table's columns: the quality column says what the budget is about."""
    quality = "cosine" if goal_of(doc).quality == "cosine" else "acc. drop"
    return ("#", "phase", "recipe", "speedup [CI]", "latency", quality, "size", "objective",
            "budget", "note")


def table_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """One tuple of cells per trial, in the order the trials were created."""
    goal = goal_of(doc)
    rows: list[tuple[str, ...]] = []
    for t in doc["trials"]:
        ok = t["status"] == "ok"
        drop = goal.drop(t)
        notes = [n for n, on in (("CHOSEN", t["id"] == doc.get("chosen")),
                                 ("pareto", t["id"] in doc["pareto"]),
                                 ("closest", t["id"] in (doc.get("closest") or [])),
                                 ("earlier/other worker", t.get("replayed"))) if on]
        rows.append((
            str(t["id"]), t["phase"], t["key"], speedup_text(t) if ok else "-",
            str(t.get("latency_verdict") or "-") if ok else "failed",
            "-" if drop is None else f"{1.0 - drop:.5f}" if goal.quality == "cosine"
            else f"{drop:.2f}{'%' if goal.relative else ''}",
            "-" if t.get("size_ratio") is None else f"{t['size_ratio'] * 100:.1f}%",
            f"x{num(t.get('objective'))}", "within" if t["within_budget"] else "OUT",
            ", ".join(notes) if ok else str(t.get("error", ""))[:80]))
    return rows


def to_markdown(doc: dict[str, Any]) -> str:
    s, stopped = doc["settings"], doc.get("stopped")
    lines = [f"# inferopt tune: {s['model']}", "",
             f"Goal: {doc['goal']}; objective `{s['objective']}`. {len(doc['trials'])} trials"
             + (f"; stopped: {stopped}" if stopped else "") + ".", "",
             markdown_table(columns(doc), table_rows(doc)) + "\n## Result", "",
             *[f"- {line}" for line in result_lines(doc)]]
    if doc["decisions"]:
        lines += ["", "## Skipped candidates", ""]
        lines += [f"- `{d['candidate']}`: {d['reason']}" for d in doc["decisions"]]
    return "\n".join(lines) + "\n"


def result_lines(doc: dict[str, Any]) -> list[str]:
    """What the search found, in words, and where it is kept."""
    goal = goal_of(doc)
    by_id = {t["id"]: t for t in doc["trials"]}
    if doc.get("chosen") is not None:
        t = by_id[doc["chosen"]]
        lines = [f"chosen: trial {t['id']} {t['key']} ({goal.describe(t)})"]
        if doc.get("artifacts", {}).get("best"):
            lines.append(f"saved: {doc['artifacts']['best']} (load with inferopt.load)")
    else:
        lines = [f"no candidate met the goal ({doc['goal']})"]
        lines += [f"closest {i}: trial {tid} {by_id[tid]['key']} ({goal.describe(by_id[tid])})"
                  for i, tid in enumerate(doc.get("closest") or [], start=1)]
    front = ", ".join(f"{i} ({by_id[i]['key']})" for i in doc["pareto"])
    lines.append(f"pareto front (objective, size, {goal.quality} drop; from the study): "
                 f"{front or 'none'}")
    if doc.get("stopped"):
        lines.append(f"stopped early: {doc['stopped']}")
    a = doc["artifacts"]
    return [*lines, f"study: {a['study']} ({a['study_name']}); summary: {a['summary']}"]


def show(doc: dict[str, Any], as_json: bool) -> None:
    """The document (``--json``), or the table and what was found; exit 1 when no candidate
    meets the goal, naming the closest on stderr."""
    import click

    lines = result_lines(doc)
    if as_json:
        click.echo(json.dumps(finite_json(doc), indent=2))
    else:
        print_table(f"inferopt tune: {len(doc['trials'])} trials", columns(doc), table_rows(doc),
                    fold=["recipe"])
        click.echo("\n".join(lines))
    if doc.get("chosen") is None:
        closest = [line for line in lines if line.startswith(("no candidate", "closest"))]
        click.echo("error: " + "\n  ".join(closest), err=True)
        sys.exit(1)
