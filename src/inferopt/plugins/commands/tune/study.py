"""One tune worker on an Optuna study: open or join the study (checking that it searches the
same baseline, goal and space on the same kind of machine), then claim and run trials until the
study's trial or time budget is spent.

Trials are stored in an RDB storage (SQLite in ``--out`` by default, any database URL with
``--storage``) with heartbeats: a trial whose worker died is failed after the grace period and
enqueued again (``RetryFailedTrialCallback``), so another worker runs it.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import attrs

from inferopt import UsageError
from inferopt.plugins.commands.tune.search import (
    Echo,
    Goal,
    Planner,
    Technique,
    TrialFailed,
    attrs_of,
    counted,
    done,
    estimate_seconds,
    key_of,
    machine_mismatch,
    params_of,
    planned,
    run_trial,
    sample,
    taken,
    worker_name,
)

SCHEMA = "inferopt.tune/2"
STUDY_DB = "study.db"


def storage_url(storage: str | None, out: Path) -> str:
    return storage or f"sqlite:///{(out / STUDY_DB).resolve()}"


def open_storage(url: str, heartbeat: float) -> Any:
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    # SQLite: wait for the other workers' writes instead of failing on a locked file
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else \
        {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's terms
                warnings.simplefilter("ignore")
                return RDBStorage(url, engine_kwargs=engine,
                                  heartbeat_interval=max(1, round(heartbeat)),
                                  grace_period=max(2, round(3 * heartbeat)),
                                  heartbeat_stale_trial_callback=RetryFailedTrialCallback(
                                      max_retry=3))
        except ImportError as exc:
            raise UsageError(f"--storage {url.split('://')[0]}://...: its database driver is "
                             f"not installed ({exc}); for PostgreSQL: pip install "
                             "'inferopt[postgres]'") from exc
        except Exception as exc:
            if attempt < 4 and type(exc).__name__ in ("OperationalError", "IntegrityError"):
                time.sleep(0.5)  # another worker is creating the tables at the same time

                continue
            raise UsageError(f"--storage: cannot open the study storage "
                             f"({type(exc).__name__}: {exc})") from exc
    raise AssertionError("unreachable")


@attrs.define
class Worker:
    """Claims and runs the study's trials until its budget is spent; see the module doc."""

    session: Any
    inputs: dict[str, Any]  # session.run keyword arguments: the loaded model and data, ...
    metrics: list[str]
    space: list[Technique]
    goal: Goal
    layers: list[str]
    max_trials: int
    budget_seconds: float
    load_seconds: float
    heartbeat: float
    machine: dict[str, Any]
    echo: Echo
    study: Any = None
    planner: Planner = attrs.field(init=False)
    mine: set[int] = attrs.field(factory=set)  # trials this worker ran
    stopped: str | None = None
    deadline: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.planner = Planner(self.space, self.goal, self.layers)

    @property
    def directions(self) -> list[str]:
        size = [] if self.goal.metric == "size" else ["minimize"]  # the size ratio
        return ["maximize", *size, "minimize"]  # objective, (size), accuracy drop

    def open(self, storage: Any, name: str, identity: dict[str, Any]) -> None:
        """Create the study (and enqueue its first trials), or join it after checking that it
        is the same search: baseline, goal, space and kind of machine."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        # the accuracy budget is each trial's constraint (trial.set_constraint), which NSGA-II
        # and study.best_trials respect
        sampler = optuna.samplers.NSGAIISampler(seed=identity["settings"]["seed"],
                                                population_size=8)
        try:
            self.study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                             directions=self.directions)
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            self._check(name, identity)
        else:
            for key, value in {**identity, "schema": SCHEMA, "machine": self.machine}.items():
                self.study.set_user_attr(key, value)
            self._enqueue(self.planner.plan([]))
            self.study.set_user_attr("ready", True)  # the others wait for this
        deadline = self.study.user_attrs.get("deadline")
        if not isinstance(deadline, float) or deadline < time.time():
            deadline = time.time() + self.budget_seconds  # a new session of this study
            self.study.set_user_attr("deadline", deadline)
        self.deadline = deadline

    def _check(self, name: str, identity: dict[str, Any]) -> None:
        for _ in range(600):  # the creator is still setting the study up
            if self.study.user_attrs.get("ready"):
                break
            time.sleep(0.1)
        attrs_ = self.study.user_attrs
        if attrs_.get("schema") != SCHEMA:
            raise UsageError(f"study {name!r} is not an inferopt tune study (or one of another "
                             "version); use another --study or --out")
        if attrs_.get("fingerprint") != identity["fingerprint"]:
            old, new = attrs_.get("settings", {}), identity["settings"]
            changed = [k for k in new if old.get(k) != new[k]] or ["the baseline model's "
                                                                   "weights or data"]
            raise UsageError(f"study {name!r} holds a tune of a different baseline (changed: "
                             f"{', '.join(changed)}); its trials cannot be reused. Choose "
                             "another --out/--study, or --restart to discard them")
        for key, flag in (("goal", "--objective/--max-accuracy-drop"),
                          ("space", "--technique")):
            if attrs_.get(key) != identity[key]:
                raise UsageError(f"study {name!r} searches another {key} ({flag}: "
                                 f"{attrs_.get(key)}, here {identity[key]}); give the same "
                                 "flags, or use another --study/--out")
        mismatch = machine_mismatch(attrs_.get("machine", {}), self.machine)
        if mismatch:
            raise UsageError(f"study {name!r} was measured on another kind of machine, so its "
                             f"timings do not compare with this one's: {mismatch}. Run this "
                             "worker on a machine like the study's, or use another --study")

    def _enqueue(self, plan: list[dict[str, Any]]) -> None:
        for item in plan:
            self.study.enqueue_trial(params_of(self.space, item["steps"]) or {},
                                     user_attrs=item)

    def _trials(self) -> list[dict[str, Any]]:
        return [attrs_of(t) for t in self.study.get_trials(deepcopy=False)]

    # -- the loop -----------------------------------------------------------------------------

    def work(self) -> None:
        from optuna.storages import fail_stale_trials

        while True:
            trials = self._trials()
            base = next((t for t in trials if t.get("phase") == "baseline" and done(t)), None)
            if base is not None and base.get("status") != "ok":
                raise UsageError(f"the baseline itself could not be measured: {base['error']}")
            stop = self._limit(trials, base is not None)
            if stop is None:
                self._enqueue(self.planner.plan(trials))
                trials = self._trials()
                waiting = any(t["state"] == "WAITING" for t in trials)
                if not waiting and self.planner.unvisited({
                        t["key"] for t in trials if "key" in t and
                        (done(t) or t["state"] == "RUNNING")}) is None:
                    stop = ""  # the whole space is measured (or being measured)
            if stop is not None:
                if any(t["state"] == "RUNNING" for t in trials):
                    # another worker's trial: wait for it; a dead worker's is failed after
                    # the grace period and enqueued again, so it runs here
                    time.sleep(min(self.heartbeat, 1.0))
                    fail_stale_trials(self.study)
                    continue
                self.stopped = stop or None
                return
            self.study.optimize(self._objective, n_trials=1, catch=(TrialFailed,))

    def _limit(self, trials: list[dict[str, Any]], started: bool) -> str | None:
        if sum(counted(t) for t in trials) >= self.max_trials:
            return f"trial limit reached ({self.max_trials} trials)"
        if not started:
            return None  # the A/A baseline runs whatever the time budget
        waiting = [t for t in trials if t["state"] == "WAITING"]
        estimate, reserve = estimate_seconds(trials, waiting[0].get("steps") if waiting
                                             else None, self.goal, self.load_seconds)
        if time.time() + estimate + reserve > self.deadline:
            spent = self.budget_seconds - (self.deadline - time.time())
            return (f"time budget reached ({self.budget_seconds / 60:g} min; {spent:.0f} s "
                    f"spent, the next trial would take about {estimate:.0f} s)")
        return None

    def _skip(self, trial: Any, reason: str) -> None:
        import optuna

        trial.set_user_attr("skipped", reason)
        raise optuna.TrialPruned(reason)

    def _objective(self, trial: Any) -> list[float]:
        import optuna

        item = dict(trial.user_attrs)
        trials = self._trials()
        if "steps" not in item:
            # the sampler's proposal is enqueued, not run: an enqueued trial carries its key
            # from its creation and is claimed atomically, so the lowest-numbered trial of a
            # key is the one that runs (below), whichever workers plan or sample it
            steps = sample(trial, self.space)
            taken_keys = {t["key"] for t in trials if "key" in t and taken(t)}
            nxt = (planned(steps, "search") if key_of(steps) not in taken_keys
                   else self.planner.unvisited(taken_keys))  # a repeat: something new
            self._enqueue([nxt] if nxt else [])
            self._skip(trial, "sampler proposal, enqueued" if nxt else "sampler repeat")
        if params_of(self.space, item["steps"]) is not None:
            sample(trial, self.space)  # the sampler learns from it (the values are fixed)
        dup = next((t for t in trials if t.get("key") == item["key"] and "skipped" not in t
                    and t["number"] != trial.number and (done(t) or (
                        t["number"] < trial.number and t["state"] in ("RUNNING", "WAITING")))),
                   None)
        if dup is not None:
            self._skip(trial, f"duplicate of trial {dup['number']}")
        me = dict(item, number=trial.number, state="RUNNING")
        if counted(me) and sum(counted(t) for t in trials if t["number"] < trial.number) \
                >= self.max_trials:
            self._skip(trial, "trial limit")
        # one write per attribute: the trial's own (sampled ones), then who runs it where
        trial.set_user_attr("run", {**item, "worker": worker_name(), "machine": self.machine})
        self.mine.add(trial.number)
        metrics = ["accuracy"] if item["phase"] == "sensitivity" else self.metrics
        try:
            rec = run_trial(self.session, self.inputs, item["steps"], metrics, self.goal)
        except TrialFailed as exc:
            rec = exc.args[0]
            self._store(trial, item, rec)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # FAIL without a status: runs again
            raise
        self._store(trial, item, rec)
        if item["phase"] == "sensitivity":
            raise optuna.TrialPruned("accuracy-only sensitivity run")
        drop = self.goal.drop(rec)
        trial.set_constraint("accuracy_budget", 1e9 if drop is None else drop - self.goal.budget)
        size = [] if self.goal.metric == "size" else [rec.get("size_ratio") or 1.0]
        return [rec["objective"] or 0.0, *size, 1e9 if drop is None else drop]

    def _store(self, trial: Any, item: dict[str, Any], rec: dict[str, Any]) -> None:
        from inferopt.plugins.commands.tune.results import describe

        trial.set_user_attr("result", rec)
        if item["phase"] == "sensitivity":
            drop = self.goal.drop(rec)
            self.echo(f"  sensitivity {item['layer']}: " + (
                f"accuracy drop {drop:.3g} with it left out" if drop is not None
                else f"failed: {rec.get('error')}"))
        else:
            self.echo(f"trial {trial.number} [{item['phase']}] {item['key']}: "
                      f"{describe(rec, self.goal)}")
