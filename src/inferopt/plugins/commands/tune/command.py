"""The ``inferopt tune`` command: its flags, one worker of the search, and its output (the
search itself: :mod:`.search`)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from inferopt import UsageError, hookimpl
from inferopt.plugins.commands.tune.search import SAMPLERS
from inferopt.utils import cli_errors, cli_input_options, cli_logging_options

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True}
# what --restart may delete in --out: the files inferopt tune writes (best: a directory), and
# what a killed one leaves (SQLite's journals, a half-saved best, a half-written summary)
OURS = {"study.db", "tune.json", "tune.md", "pareto.png", "importance.png", "best",
        ".tune.lock", ".best-trial", ".tune.running"}
LEFTOVERS = re.compile(r"study\.db-(journal|wal|shm)|\.best\.(partial|replaced|discarded)-\w+"
                       r"|\.tune\.(json|md)\.\d+\.tmp")
MARKS = {"study.db", ".tune.lock", ".best-trial", ".tune.running"}  # only tune writes these
OLD_LOG = "trials.jsonl"  # an older tune's trial log


@click.command(context_settings=CONTEXT)
@cli_input_options
@click.option("--metric", "metrics", multiple=True, metavar="NAME[:k=v,...]",
              help="A metric, or options for one (latency:precision=thorough); latency, size "
                   "and the budget's metric (accuracy, or fidelity with --min-cosine) are always "
                   "measured.")
@click.option("--max-accuracy-drop", metavar="POINTS|PCT%",
              help="The accuracy budget: points of top-1 accuracy (1.0) or a share of the "
                   "baseline's accuracy (2%). Default: 1.0.")
@click.option("--min-cosine", type=click.FloatRange(0.0, 1.0), metavar="C",
              help="A fidelity budget instead, for data without labels (a sentence encoder): "
                   "the mean per-sample cosine of each candidate's outputs to the baseline's "
                   "must stay at or above C (0.99).")
@click.option("--objective", default="latency", metavar="METRIC[.FIELD]",
              help="What the chosen candidate is best at, among those within the budget: any "
                   "installed metric (its primary quantity: latency, size, throughput, ...) or "
                   "any quantity a metric declares with a direction (METRIC.FIELD).")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="Stop starting trials when this much time is spent (shared by the study's "
                   "workers; a rerun after it passed gets a new one).")
@click.option("--trials", "max_trials", type=click.IntRange(min=1), default=40,
              help="At most this many trials in the study (every worker's and earlier runs' "
                   "included).")
@click.option("--technique", "-t", "techniques", multiple=True, metavar="NAME[:k=v,...]",
              help="Search only these optimizers (repeat); options given are fixed. Default: "
                   "every installed optimizer that declares searchable options.")
@click.option("--try-backend", "backends", multiple=True, metavar="NAME[:k=v,...]",
              help="Also try the candidates on this backend (repeat): the model as it is and "
                   "each technique there, measured against the baseline on --backend (as run "
                   "--baseline-backend does). Same device as --backend.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="nsga2",
              help="What proposes trials after the planned ones: Optuna's NSGA-II, TPE or "
                   "random sampler, or grid: the rest of the space in a fixed order, so that "
                   "any number of workers runs the same trials. A study keeps its sampler.")
@click.option("--out", "-o", metavar="DIR", default="inferopt-tune",
              help="Where the study (study.db, unless --storage), the summary and the chosen "
                   "model go. Rerunning with the same DIR continues the search.")
@click.option("--storage", metavar="URL",
              help="The study's database (sqlite:///path.db, postgresql+psycopg://user@host/db): "
                   "workers on several machines share one search. Default: DIR/study.db.")
@click.option("--study", "study_name", metavar="NAME", default="inferopt-tune",
              help="The study to create or join in the storage.")
@click.option("--heartbeat-seconds", type=click.FloatRange(min=0.5), default=10.0,
              help="How often a worker says it is alive; a trial whose worker stays silent 3 "
                   "times as long is run again.")
@click.option("--restart", is_flag=True, help="Discard the study and files in --out and start "
                                              "over.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only the tune document (inferopt.tune/2) on stdout.")
@cli_logging_options(default_level="warning")
def tune(**flags: Any) -> None:
    """Search the installed techniques for the best recipe within an accuracy budget (or,
    with --min-cosine, a fidelity budget for data without labels).

    Every trial is measured against the same baseline (latency interleaved A/B) and stored in
    an Optuna study; start more workers with the same --storage and --study to share the
    search. The best candidate that meets the goal is saved to DIR/best like a run. Exits 1
    when no candidate meets the goal, listing the three closest.
    """
    from inferopt.plugins.commands.tune.results import show
    from inferopt.utils import configure_logging, disable_progress

    configure_logging(flags["log_format"], flags["log_level"])
    disable_progress(flags["as_json"])
    with cli_errors(flags["debug"], f"the finished trials are in the study "
                    f"({_shown(flags['storage'], flags['out'])}); rerun the same command to "
                    "continue"):
        doc = _search(flags, echo=lambda line: click.echo(line, err=True))
    show(doc, flags["as_json"])


def _search(flags: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """Check the flags and ``--out``, load the baseline once, open or join the study, run
    trials until the study's budget is spent, then summarize and save: the ``inferopt.tune/2``
    document."""
    import inferopt
    from inferopt.plugins.commands.tune.results import finish
    from inferopt.plugins.commands.tune.search import (
        Goal,
        Worker,
        fingerprint,
        search_space,
        spec_text,
    )
    from inferopt.utils import parse_accuracy_budget, parse_spec

    if flags["min_cosine"] is not None:
        if flags["max_accuracy_drop"] is not None:
            raise UsageError("give one quality budget: --max-accuracy-drop or --min-cosine")
        gate: dict[str, float | None] = {}  # the fidelity metric offers no gate: none on best/
        goal = Goal(flags["objective"], round(1.0 - flags["min_cosine"], 12), False, "cosine")
    else:
        gate = parse_accuracy_budget(flags["max_accuracy_drop"] or "1.0")
        goal = Goal(flags["objective"], next(iter(gate.values())) or 0.0,
                    "max_relative_accuracy_drop" in gate)
    out, storage = Path(flags["out"]), flags["storage"]
    techniques = tuple(parse_spec(t, "--technique") for t in flags["techniques"])
    backends = list(dict.fromkeys(str(parse_spec(b, "--try-backend")) for b in flags["backends"]))

    started = time.monotonic()
    session = inferopt.Session(strict=True if flags["strict_plugins"] else None)
    if goal.metric not in session.names("metric"):
        raise UsageError(f"--objective {goal.objective!r}: no installed metric {goal.metric!r}; "
                         f"metrics: {', '.join(session.names('metric'))} (METRIC or "
                         "METRIC.FIELD)")
    goal.check(session.describe("metric", goal.metric)["description"])
    space, notes = search_space(session, techniques)
    _check_storage(storage)
    _check_out(out, flags["restart"])
    given_specs = {k: flags[k] for k in ("model", "data", "split", "trust_model")}
    model, data, resolved = session.load_inputs(flags["recipe"], batch_size=flags["batch_size"],
                                                seed=flags["seed"], **given_specs)
    load_seconds = time.monotonic() - started
    if resolved.get("baseline_backend"):
        raise UsageError(f"{flags['recipe']}: baseline_backend {resolved['baseline_backend']!r}: "
                         "tune measures the baseline on --backend; give the other backend as "
                         "--try-backend NAME instead")
    given = list(flags["metrics"]) or (resolved["metrics"] if resolved["metrics_explicit"] else [])
    settings = {**{k: resolved[k] for k in ("model", "data", "split", "batch_size", "seed")},
                "backend": flags["backend"] or resolved["backend"], "metrics": given,
                "output": flags["output"] or resolved["output"]}
    _check_quality(goal, model, data, resolved["data"], settings["output"], given)
    names = [m.partition(":")[0] for m in given]
    always = ("latency", goal.measure, "size", goal.metric)
    metrics = list(dict.fromkeys(given + [m for m in always if m not in names]))
    # session.run's arguments for every trial and for saving the choice, besides model and data
    run_args = {"backend": settings["backend"], "seed": settings["seed"],
                "output": settings["output"],
                "batch_size": settings["batch_size"] if resolved["batch_size_explicit"] else None}
    _check_backends(session, settings["backend"], backends)
    goal_json = {"objective": goal.objective, "max_accuracy_drop": goal.budget,
                 "relative": goal.relative,
                 **({"quality": goal.quality, "min_cosine": flags["min_cosine"]}
                    if goal.quality != "accuracy" else {})}
    with _claim(out, storage, flags["restart"], flags["study_name"]):  # held until the end
        worker = Worker(session, {"model": model, "data": data, **run_args}, metrics, space, goal,
                        flags["max_trials"], flags["budget_minutes"] * 60, load_seconds,
                        flags["heartbeat_seconds"], echo, flags["sampler"], backends)
        try:
            worker.open(storage or f"sqlite:///{(out / 'study.db').resolve()}",
                        flags["study_name"], {
                            "fingerprint": fingerprint(model, data, settings),
                            "settings": settings, "goal": goal_json,
                            "space": [t.to_json() for t in space], "sampler": flags["sampler"],
                            "backends": backends})
        except UsageError as exc:
            if storage is None and str(exc).startswith("study storage"):
                raise UsageError(f"{exc}; if {out / 'study.db'} is damaged, --restart discards "
                                 "it") from exc
            raise
        worker.work()

        def save(chosen: dict[str, Any]) -> Any:
            """The chosen recipe, run again as an ordinary ``inferopt run`` into ``OUT/best`` (from
            the same recipe file and flags, which it resolves as the search did)."""
            echo(f"saving trial {chosen['id']} ({chosen['key']}) to {out / 'best'}")
            args = worker.run_args(chosen.get("backend"))  # as the trial ran, but from the specs
            return session.run(
                flags["recipe"], metrics=metrics, gates=gate, out=out / "best", overwrite=True,
                optimize=[spec_text(s["name"], s["options"]) for s in chosen["steps"]],
                **given_specs, **{k: v for k, v in args.items() if k not in ("model", "data")})

        doc = finish(worker, {**settings, **goal_json, "sampler": flags["sampler"],
                              "budget_minutes": round(flags["budget_minutes"], 3),
                              "max_trials": flags["max_trials"], "try_backends": backends,
                              "techniques": [str(t) for t in techniques] or None},
                     _shown(storage, out.resolve()), notes, out, save)
        doc["seconds"] = round(time.monotonic() - started, 2)
    return doc


def _check_quality(goal: Any, model: Any, data: Any, data_spec: str, output: str | None,
                   metrics: tuple[str, ...]) -> None:
    """That the budget and the objective can be measured on this model and data."""
    import torch

    from inferopt.utils import call_model, primary_output

    if goal.metric == "fidelity":
        raise UsageError("--objective fidelity: a candidate's outputs can only be as close to "
                         "the baseline's as the baseline itself; budget it with --min-cosine "
                         "and choose another objective")
    if data.eval[0].labels is None:
        if goal.quality == "accuracy":
            raise UsageError(f"--data {data_spec!r} has no labels, so no accuracy to "
                             "keep within --max-accuracy-drop; give a fidelity budget instead: "
                             "--min-cosine 0.99")
        if "accuracy" in [goal.metric, *(m.partition(":")[0] for m in metrics)]:
            raise UsageError(f"--data {data_spec!r} has no labels: the accuracy metric "
                             "cannot be measured; leave it out of --objective and --metric")
    if goal.quality == "cosine":
        with torch.inference_mode():
            out = primary_output(call_model(model.eval(), data.eval[0].inputs), output)
        if not out.is_floating_point():
            raise UsageError(f"--min-cosine: the model's output is {out.dtype} (predictions), "
                             "whose cosine says nothing about how many changed; give data with "
                             "labels and --max-accuracy-drop, or pick a float output with "
                             "--output")


def _check_backends(session: Any, base: str, backends: list[str]) -> None:
    """Each --try-backend: installed, its options valid, on --backend's device, available
    here, and not --backend itself (before any trial runs on it)."""
    from inferopt.utils import parse_spec

    base_spec = parse_spec(base, "--backend")
    device = session.backend(base_spec.name, **base_spec.options).device
    for text in backends:
        spec = parse_spec(text, "--try-backend")
        backend = session.backend(spec.name, **spec.options)
        where = f"--try-backend {text}"
        if spec == base_spec:
            raise UsageError(f"{where}: that is --backend, where every candidate runs anyway")
        if backend.device != device:
            raise UsageError(f"{where}: it runs on {backend.device!r} and --backend {base} on "
                             f"{device!r}; candidates are timed against the baseline on one "
                             "device: try backends of that device")
        if reason := backend.available():
            raise UsageError(f"{where}: cannot run here: {reason}")


def _shown(storage: str | None, out: str | Path) -> str:
    """Where the study is, as tune prints and writes it: never a database URL's credentials."""
    return storage.split("://")[0] + "://..." if storage else f"sqlite:///{out}/study.db"


def _check_storage(storage: str | None) -> None:
    """A --storage that keeps the study: not an in-memory SQLite database."""
    if storage and storage.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        database: str | None = "-"
        with contextlib.suppress(Exception):  # a malformed URL: the storage says so later
            database = make_url(storage).database
        if database in (None, "", ":memory:"):
            raise UsageError(f"--storage {storage}: an in-memory database is lost when the "
                             "worker exits and no other worker can join it; give a file, "
                             "sqlite:///path/study.db")


def _check_out(out: Path, restart: bool) -> list[Path]:
    """That --out is new, empty, or an earlier tune's: never a directory of the user's files,
    nor one where tune's own names are links or of the wrong kind (tune would write through
    them or delete them). Returns what is in it."""
    where = f"--out {str(out)!r}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{where} exists and is not a directory; choose another")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise UsageError(f"{where}: a parent of it is a file; choose another directory")
    cwd = Path.cwd().resolve()
    if cwd == out.resolve() or out.resolve() in cwd.parents:
        raise UsageError(f"{where} is the current directory or contains it; give a new "
                         "subdirectory, for example --out tune-runs/mine")
    paths = {p.name: p for p in out.iterdir()} if out.is_dir() else {}
    stray = sorted(n for n in paths if n not in OURS and not LEFTOVERS.fullmatch(n)
                   and n != OLD_LOG)
    if OLD_LOG in paths and not restart:
        raise UsageError(f"{where} holds a trial log of an older inferopt tune ({OLD_LOG}); "
                         "tune now keeps its trials in an Optuna study and cannot continue that "
                         "log. Use another --out, or --restart to discard it")
    if paths and not (MARKS | {OLD_LOG}) & paths.keys():
        raise UsageError(f"{where} is not empty and holds none of the files a tune leaves "
                         "(study.db, .tune.lock, ...), so it is not an earlier tune to continue; "
                         "choose another directory")
    if restart and stray:
        raise UsageError(f"--restart: {str(out)!r} holds files inferopt tune did not write "
                         f"({', '.join(stray)}); remove them or choose another --out")
    for name, path in paths.items():
        if name not in OURS:
            continue
        wrong = ("a symbolic link" if path.is_symlink() else
                 "not an inferopt run" if name == "best" and not (path / "inferopt.json").is_file()
                 else "a directory" if name != "best" and path.is_dir() else None)
        if wrong:
            raise UsageError(f"{where}: {name} is {wrong}, where tune keeps its own {name}; "
                             "move it away or choose another directory")
    return list(paths.values())


def _claim(out: Path, storage: str | None, restart: bool, study_name: str) -> Any:
    """Create --out and take its running lock (shared by the workers in it), after discarding
    the earlier search with --restart: refused while a worker runs there, and checked again
    under the lock, before anything is deleted. Returns the open lock file, to close when the
    worker ends."""
    out.mkdir(parents=True, exist_ok=True)
    running = (out / ".tune.running").open("a")
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no locks; one worker per --out (docs)
        fcntl = None  # type: ignore[assignment]
    try:
        if restart:
            if fcntl is not None:
                try:
                    fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UsageError(f"--restart: a tune is running in {str(out)!r}; stop it "
                                     "first (or let it finish), then restart") from None
            checked = _check_out(out, restart)  # what is there now, not before loading
            delete = _study_to_delete(storage, study_name) if storage is not None else None
            from inferopt.plugins.commands.tune.results import remove

            for path in checked:
                if path.name != ".tune.running":
                    remove(path)
            if delete is not None:
                delete()
        if fcntl is not None:
            fcntl.flock(running, fcntl.LOCK_SH)  # blocks while another worker restarts
    except BaseException:
        running.close()
        raise
    return running


def _study_to_delete(storage: str, study_name: str) -> Callable[[], None] | None:
    """--restart with --storage: what deletes the study of that name (None: there is none),
    refused before anything is deleted if it is not an inferopt tune's."""
    import optuna

    from inferopt.plugins.commands.tune.search import foreign

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None
    except Exception as exc:
        raise UsageError(f"--storage {_shown(storage, '')}: cannot open it "
                         f"({type(exc).__name__}: {exc})") from exc
    if foreign(study):
        raise UsageError(f"--restart: study {study_name!r} in --storage is not an inferopt tune "
                         "study; tune deletes only its own. Use another --study")
    return lambda: optuna.delete_study(study_name=study_name, storage=storage)


@hookimpl
def inferopt_register_commands(cli: Any) -> None:
    cli.add_command(tune)
