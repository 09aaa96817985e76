"""``inferopt tune`` end to end: check the flags and ``--out``, load the baseline once, open or
join the study, run trials until the study's budget is spent, then summarize and save."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from inferopt import UsageError
from inferopt.plugins.commands.tune.results import (
    BEST,
    IMPORTANCE_PLOT,
    MARKDOWN,
    PARETO_PLOT,
    SUMMARY,
    finish,
)
from inferopt.plugins.commands.tune.search import (
    Echo,
    Goal,
    fingerprint,
    machine,
    search_space,
    weighted_layers,
)
from inferopt.plugins.commands.tune.study import (
    SCHEMA,
    STUDY_DB,
    Worker,
    open_storage,
    storage_url,
)

OURS = {STUDY_DB, SUMMARY, MARKDOWN, PARETO_PLOT, IMPORTANCE_PLOT, BEST, ".tune.lock",
        ".best-trial"}
OLD_LOG = "trials.jsonl"
ALWAYS = ("latency", "accuracy", "size")


def tune_search(flags: dict[str, Any], echo: Echo) -> dict[str, Any]:
    """Run one worker of the search with the command's ``flags``; the ``inferopt.tune/2``
    document."""
    import inferopt
    from inferopt.utils import parse_accuracy_budget, parse_spec

    gate = parse_accuracy_budget(flags["max_accuracy_drop"])
    budget, relative = next(iter(gate.values())) or 0.0, "max_relative_accuracy_drop" in gate
    objective, out, storage = flags["objective"], Path(flags["out"]), flags["storage"]
    budget_seconds, max_trials = flags["budget_minutes"] * 60, flags["max_trials"]
    techniques = tuple(parse_spec(t, "--technique") for t in flags["techniques"])
    load = {k: flags[k] for k in ("model", "data", "split", "batch_size", "seed", "trust_model")}

    started = time.monotonic()
    session = inferopt.Session(strict=True if flags["strict_plugins"] else None)
    goal = Goal.parse(objective, budget, relative)
    if goal.metric not in session.names("metric"):
        raise UsageError(f"--objective {objective!r}: no installed metric {goal.metric!r}; "
                         f"metrics: {', '.join(session.names('metric'))} (METRIC or "
                         "METRIC.FIELD)")
    space, notes = search_space(session, techniques)
    _check_out(out, storage, flags["restart"], flags["study_name"])
    model, data, resolved = session.load_inputs(flags["recipe"], **load)
    load_seconds = time.monotonic() - started
    given = list(flags["metrics"]) or (resolved["metrics"] if resolved["metrics_explicit"] else [])
    names = [m.partition(":")[0] for m in given]
    metrics = given + [m for m in (*ALWAYS, goal.metric) if m not in names]
    metrics = list(dict.fromkeys(metrics))
    settings = {"model": resolved["model"], "data": resolved["data"], "split": resolved["split"],
                "batch_size": resolved["batch_size"], "seed": resolved["seed"],
                "backend": flags["backend"] or resolved["backend"], "metrics": given,
                "output": flags["output"] or resolved["output"]}
    identity = {"fingerprint": fingerprint(model, data, settings), "settings": settings,
                "goal": {"objective": objective, "max_accuracy_drop": budget,
                         "relative": relative},
                "space": [t.to_json() for t in space]}
    inputs = {"model": model, "data": data, "backend": settings["backend"],
              "seed": settings["seed"], "output": settings["output"],
              "batch_size": settings["batch_size"] if resolved["batch_size_explicit"] else None}
    url = storage_url(storage, out)
    out.mkdir(parents=True, exist_ok=True)
    worker = Worker(session, inputs, metrics, space, goal, weighted_layers(model), max_trials,
                    budget_seconds, load_seconds, flags["heartbeat_seconds"], machine(), echo)
    worker.open(open_storage(url, flags["heartbeat_seconds"]), flags["study_name"], identity)
    worker.work()

    def save(chosen: dict[str, Any]) -> Any:
        """The chosen recipe, run again as an ordinary ``inferopt run`` into ``OUT/best``."""
        echo(f"saving trial {chosen['id']} ({chosen['key']}) to {out / BEST}")
        from inferopt.plugins.commands.tune.search import spec_text

        split = resolved["split"]
        return session.run(
            flags["recipe"], model=settings["model"], data=settings["data"], metrics=metrics,
            optimize=[spec_text(s["name"], s["options"]) for s in chosen["steps"]],
            backend=settings["backend"], seed=settings["seed"], output=settings["output"],
            batch_size=inputs["batch_size"], trust_model=load["trust_model"],
            split=",".join(f"{k}={v}" for k, v in split.items()) if split else None,
            gates={"max_relative_accuracy_drop" if relative else "max_accuracy_drop": budget},
            out=out / BEST, overwrite=True)

    head = {"schema": SCHEMA, "settings": {
        **settings, "objective": objective, "max_accuracy_drop": budget, "relative": relative,
        "budget_minutes": round(budget_seconds / 60, 3), "max_trials": max_trials,
        "techniques": [str(t) for t in techniques] or None},
        "fingerprint": identity["fingerprint"], "notes": notes}
    doc = finish(worker, head, out, save)
    doc["artifacts"]["study"] = url if storage is None else f"{url.split('://')[0]}://..."
    doc["artifacts"]["study_name"] = flags["study_name"]
    doc["seconds"] = round(time.monotonic() - started, 2)
    return doc


def _check_out(out: Path, storage: str | None, restart: bool, study_name: str) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory; choose another")
    cwd = Path.cwd().resolve()
    if cwd == out.resolve() or out.resolve() in cwd.parents:
        raise UsageError(f"--out {str(out)!r} is the current directory or contains it; give a "
                         "new subdirectory, for example --out tune-runs/mine")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if OLD_LOG in names and not restart:
        raise UsageError(f"--out {str(out)!r} holds a trial log of an older inferopt tune "
                         f"({OLD_LOG}); tune now keeps its trials in an Optuna study and cannot "
                         "continue that log. Use another --out, or --restart to discard it")
    if names - OURS - {OLD_LOG} and not names & OURS and not restart:
        raise UsageError(f"--out {str(out)!r} is not empty and holds no {STUDY_DB}, so it is "
                         "not an earlier tune to continue; choose another directory")
    if restart:
        if names - OURS - {OLD_LOG}:
            raise UsageError(f"--restart: {str(out)!r} holds files inferopt tune did not write "
                             f"({', '.join(sorted(names - OURS - {OLD_LOG}))}); remove them "
                             "or choose another --out")
        for name in names:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if storage is not None:
            import optuna

            try:
                optuna.delete_study(study_name=study_name, storage=storage)
            except KeyError:
                pass
