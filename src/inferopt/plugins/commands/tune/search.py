"""The search: the space, the goal, and the worker that plans, claims and runs the study's
trials. A trial is one recipe run with :meth:`inferopt.Session.run` on the baseline loaded once
per worker, keyed by its recipe so that no recipe is enqueued or run twice."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import attrs

from inferopt import InferoptError, Interrupted, UsageError
from inferopt.utils import cpu_flags, cpu_model, iter_tensors, parse_spec, weights_bytes

SCHEMA = "inferopt.tune/2"
# the order techniques are tried in and combined in: structural changes before quantization
KIND_RANK = {"quantization": 0, "pruning": 1, "": 2, "distillation": 3}
COMBINE_RANK = {"distillation": 0, "pruning": 1, "": 2, "quantization": 3}
MAX_SENSITIVITY_LAYERS = 32
SETUP_WAIT = 60.0  # seconds a joining worker waits for the study's creator to set it up
EPSILON = 1e-9
NOT_COUNTED = ("baseline", "sensitivity")
SAMPLERS = ("nsga2", "tpe", "random", "grid")
Trial = dict[str, Any]  # a study trial as the search reads it (attrs_of)


class TrialFailed(Exception):
    """A trial's step raised: the trial fails alone (recorded), the search goes on."""


def spec_text(name: str, options: dict[str, Any]) -> str:
    """``NAME[:k=v,...]`` as ``--optimize`` takes it (lists joined with ``|``)."""
    def fmt(v: Any) -> str:
        return ("|".join(map(str, v)) if isinstance(v, list | tuple)
                else str(v).lower() if isinstance(v, bool) else str(v))
    opts = ",".join(f"{k}={fmt(v)}" for k, v in sorted(options.items()))
    return f"{name}:{opts}" if opts else name


def key_of(steps: list[dict[str, Any]], backend: str | None = None) -> str:
    """A recipe's key: its steps, and ``@ BACKEND`` when it runs on a --try-backend."""
    recipe = " + ".join(spec_text(s["name"], s["options"]) for s in steps) or "none"
    return f"{recipe} @ {backend}" if backend else recipe


def planned(steps: list[dict[str, Any]], phase: str, backend: str | None = None,
            **extra: Any) -> Trial:
    """A trial to enqueue, as its user attributes (a sensitivity run's key says that it
    measures accuracy only: it is not the candidate of that recipe)."""
    key = key_of(steps, backend) + (" (accuracy only)" if phase == "sensitivity" else "")
    return {"key": key, "phase": phase, "steps": steps, "backend": backend, **extra}


def num(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, int | float) else "-"


def speedup_text(t: Trial) -> str:
    ci = t.get("speedup_ci") or [None, None]
    return f"x{num(t.get('speedup'))} [{num(ci[0])}-{num(ci[1])}]"


@attrs.define
class Technique:
    """One optimizer of the search space: its fixed options and the values to try for the
    others (the default first)."""

    name: str
    kind: str
    plugin: str
    distribution: str
    defaults: dict[str, Any]
    fixed: dict[str, Any]
    dims: dict[str, list[Any]]

    def step(self, values: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.fixed, **values}
        return {"name": self.name, "options": {k: v for k, v in merged.items()
                                               if k in self.fixed or self.defaults.get(k) != v}}

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the searchable values, as steps (the default first)."""
        return [self.step(dict(zip(self.dims, combo, strict=True)))
                for combo in itertools.product(*self.dims.values())]

    def to_json(self) -> dict[str, Any]:
        return {"technique": self.name, "kind": self.kind, "plugin": self.plugin,
                "distribution": self.distribution, "fixed": self.fixed, "search": self.dims,
                "skip_option": "skip" in self.defaults}


def search_space(session: Any, techniques: tuple[Any, ...]) -> tuple[list[Technique], list[str]]:
    """The techniques to search, and notes on searchable values a plugin itself rejects.
    Without ``techniques`` (``parse_spec`` results), every installed optimizer that declares
    searchable values (``inferopt.option(..., searchable=...)``); a spec's options are fixed."""
    names = [s.name for s in techniques]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"--technique {', '.join(twice)} is given twice; give each technique "
                         "once (fix options with NAME:key=value)")
    techniques = techniques or tuple(
        parse_spec(n, "-t") for n in session.names("optimizer")
        if any(o.get("searchable") for o in session.describe("optimizer", n)["options"]))
    if not techniques:
        raise UsageError("no installed optimizer declares searchable options; name the "
                         "techniques to try with --technique NAME")
    space, notes = [], []
    for spec in techniques:
        info = session.describe("optimizer", spec.name)  # an unknown name is a UsageError
        instance = session.optimizer(spec.name, **spec.options)  # checks the fixed options
        fixed = {k: getattr(instance, k) for k in (k.replace("-", "_") for k in spec.options)}
        fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in fixed.items()}
        dims: dict[str, list[Any]] = {}
        for o in (o for o in info["options"] if o["name"] not in fixed):
            values = [o["default"]]
            for value in o.get("searchable") or ():
                try:
                    session.optimizer(spec.name, **{**spec.options, o["name"]: value})
                except UsageError as exc:
                    notes.append(f"{spec.name}: searchable value {o['name']}={value!r} left out "
                                 f"(plugin {info['plugin']!r} declares a value it rejects: {exc})")
                    continue
                values += [value] if value not in values else []
            if len(values) > 1:
                dims[o["name"]] = values
        kind = str(getattr(session.optimizer_class(spec.name), "kind", "") or "")
        space.append(Technique(spec.name, kind, info["plugin"], info["distribution"],
                               {o["name"]: o["default"] for o in info["options"]}, fixed, dims))
    space.sort(key=lambda t: (KIND_RANK.get(t.kind, KIND_RANK[""]), t.name))
    return space, notes


def machine() -> dict[str, Any]:
    """What a trial's timings depend on: the CPU and its flags, the GPU, torch."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": sorted(cpu_flags()),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def fingerprint(model: Any, data: Any, settings: dict[str, Any]) -> str:
    """A hash of the baseline: its weights, every sample of the data, the settings."""
    import torch

    digest = hashlib.sha256(weights_bytes(model))
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for batch in itertools.chain(data.eval, data.calibration, data.train):
        for tensor in iter_tensors((batch.inputs, batch.labels)):
            digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:16]


@attrs.frozen
class Goal:
    """The quality budget and the objective, ``METRIC[.FIELD]`` (default: the metric's primary
    quantity), better ``lower`` or ``higher`` as the metric describes it. The budget is a drop
    of top-1 accuracy (points, or ``relative``: percent of the baseline's), or with ``quality``
    ``cosine`` a drop of the fidelity metric's cosine to the baseline's outputs (for data
    without labels)."""

    objective: str
    budget: float
    relative: bool
    quality: str = "accuracy"  # or "cosine"

    @property
    def metric(self) -> str:
        return self.objective.partition(".")[0]

    @property
    def measure(self) -> str:
        """The metric that measures the quality the budget is about."""
        return "fidelity" if self.quality == "cosine" else "accuracy"

    def drop(self, t: Trial) -> float | None:
        if self.quality == "cosine":
            return t.get("cosine_drop")
        return t.get("accuracy_drop_percent" if self.relative else "accuracy_drop_points")

    def within(self, t: Trial) -> bool:
        drop = self.drop(t)
        return t.get("status") == "ok" and drop is not None and drop <= self.budget + EPSILON

    def excess(self, t: Trial) -> float:
        drop = self.drop(t)
        return math.inf if drop is None else max(0.0, drop - self.budget)

    def meets(self, t: Trial) -> bool:
        return self.within(t) and bool(t.get("improves")) and is_candidate(t)

    def text(self) -> str:
        budget = (f"cosine to the baseline's outputs >= {1.0 - self.budget:g}"
                  if self.quality == "cosine" else
                  f"accuracy drop <= {self.budget:g}% of the baseline's accuracy"
                  if self.relative else f"accuracy drop <= {self.budget:g} points")
        return (f"{budget} and better {self.objective} than the baseline (a paired metric: "
                f"its confidence interval; else by more than its noise)")

    def describe(self, t: Trial) -> str:
        """A trial's numbers in one line."""
        if t.get("status") != "ok":
            return f"failed: {t.get('error')}"
        parts = []
        if t.get("speedup") is not None:
            parts.append(f"{speedup_text(t)} {t.get('latency_verdict')}")
        if (drop := self.drop(t)) is not None:
            parts.append(f"cosine {1.0 - drop:.5f}" if self.quality == "cosine" else
                         f"accuracy drop {drop:.3g}{'%' if self.relative else ' pts'}")
        if t.get("size_ratio") is not None:
            parts.append(f"size {t['size_ratio'] * 100:.1f}%")
        if t.get("objective") is not None and self.metric not in ("latency", "size"):
            parts.append(f"{self.metric} x{t['objective']:.2f}")
        return ", ".join([*parts, f"{t['seconds']:.1f} s"])

    def check(self, description: dict[str, Any]) -> None:
        """That the objective is a quantity with a direction, from its metric's description."""
        quantities = description.get("quantities", {})
        field = self.objective.partition(".")[2] or description.get("primary")
        if quantities.get(field, {}).get("better") not in ("lower", "higher"):
            directed = [f"{self.metric}.{k}" for k, q in quantities.items()
                        if q.get("better") in ("lower", "higher") and not k.endswith("*")]
            raise UsageError(f"--objective {self.metric}.{field}: not a quantity with a "
                             f"direction; use one of {', '.join(directed) or '(none)'}")

    def judge(self, report: Any) -> tuple[float | None, bool]:
        """(how many times better than the baseline, whether the run's verdict calls it
        better) of the objective in ``report``, which measured its metric."""
        ratio, judgement = report.improvement(self.metric, self.objective.partition(".")[2]
                                              or None)
        return ratio, judgement == "better"


def record(report: Any, goal: Goal) -> Trial:
    """A finished trial's numbers, as the study keeps them (user attributes); a trial whose
    backend refused a step failed (it would measure another recipe than its own)."""
    if refused := [s.refused for s in report.steps if s.refused]:
        return {"status": "failed", "error": refused[0]}
    v, doc = report.verdict, report.to_dict()
    doc.pop("environment", None)  # kept once, with the study's machine
    # without the quality measured (an accuracy budget, data without labels): no candidate
    value, improves = goal.judge(report) if goal.measure in report.optimized else (None, False)
    cosine = report.optimized.get("fidelity", {}).get("cosine")
    if not (isinstance(cosine, int | float) and math.isfinite(cosine)):
        cosine = None  # not measured, or NaN outputs: not within a cosine budget
    return {"status": "ok", "objective": value, "improves": improves,
            **{k: v.get(k) for k in ("speedup", "speedup_ci", "accuracy_drop_points",
                                     "accuracy_drop_percent", "size_ratio")},
            "latency_verdict": v.get("latency"),
            "accuracy": report.optimized.get("accuracy", {}).get("top1"),
            "cosine_drop": None if cosine is None else 1.0 - cosine,
            "step_seconds": sum(s.seconds for s in report.steps),
            "summaries": [s.details.get("summary", "") for s in report.steps],
            "warnings": report.warnings, "report": doc}


def is_candidate(t: Trial) -> bool:
    """Changes something: steps, or another backend than the baseline's."""
    return bool(t.get("steps") or t.get("backend"))


def foreign(study: Any) -> bool:
    """Not an inferopt tune study (nor one being set up): another program's, or another
    version's. Its creator sets the schema first; a study with nothing yet is being set up."""
    theirs = study.user_attrs
    if "schema" in theirs:
        return bool(theirs["schema"] != SCHEMA)
    if "fingerprint" in theirs:  # an earlier version set it first
        return False
    return bool(theirs or study.get_trials(deepcopy=False))


def attrs_of(trial: Any) -> Trial:
    """A study trial as the search reads it: its user attributes (``key``, ``phase``,
    ``steps``; ``run``: who ran it where; ``result``: what it measured) in one dict, with its
    number and state."""
    ua = trial.user_attrs
    return {**{k: v for k, v in ua.items() if k not in ("run", "result")}, **ua.get("run", {}),
            **ua.get("result", {}), "number": trial.number, "state": trial.state.name}


def done(t: Trial) -> bool:
    """Measured (or failed by its own step): what counts and what plans build on."""
    return (t["state"] == "COMPLETE" or (t["state"] == "FAIL" and t.get("status") == "failed")
            or (t["state"] == "PRUNED" and t.get("phase") == "sensitivity" and "status" in t))


def taken(t: Trial) -> bool:
    """Holds its key: measured, running or waiting (not skipped, not interrupted)."""
    return "key" in t and (done(t) or (t["state"] in ("RUNNING", "WAITING")
                                       and "skipped" not in t))


def taken_keys(trials: list[Trial]) -> dict[str, Trial]:
    return {t["key"]: t for t in trials if taken(t)}


def counted(t: Trial) -> bool:
    """Counts against --trials: a candidate measured or being measured."""
    return taken(t) and t["state"] != "WAITING" and t.get("phase") not in NOT_COUNTED


@attrs.define
class Worker:
    """One worker of the study: opens or joins it, enqueues the planned trials, claims and runs
    them. The plan is derived from the trials in the study only, so workers agree on it."""

    session: Any
    inputs: dict[str, Any]  # session.run keyword arguments: the loaded model and data, ...
    metrics: list[str]
    space: list[Technique]
    goal: Goal
    max_trials: int
    budget_seconds: float
    load_seconds: float
    heartbeat: float
    echo: Callable[[str], None]
    sampler: str = "nsga2"  # one of SAMPLERS
    backends: list[str] = attrs.field(factory=list)  # --try-backend specs
    study: Any = None
    machine: dict[str, Any] = attrs.field(init=False, factory=machine)
    layers: list[str] = attrs.field(init=False)
    mine: set[int] = attrs.field(factory=set)  # trials this worker ran
    decisions: list[dict[str, Any]] = attrs.field(factory=list)  # pairs not run, and why
    stopped: str | None = None
    deadline: float = 0.0

    @layers.default
    def _weighted_layers(self) -> list[str]:
        """Leaf modules with a weight matrix or kernel: what quantizers and pruners act on."""
        import torch

        return [name for name, m in self.inputs["model"].named_modules()
                if name and not list(m.children())
                and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
                and m.weight.dim() >= 2]

    @property
    def directions(self) -> list[str]:
        size = [] if self.goal.metric == "size" else ["minimize"]  # the size ratio
        return ["maximize", *size, "minimize"]  # objective, (size), accuracy drop

    def open(self, url: str, name: str, identity: dict[str, Any]) -> None:
        """Create the study (and enqueue its first trials), or join it after checking that it
        is the same search: baseline, goal, space, sampler and kind of machine."""
        import optuna

        storage = self._storage(url)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        # the accuracy budget is each trial's constraint (trial.set_constraint), which NSGA-II
        # and study.best_trials respect. grid asks no sampler: its points are enqueued by the
        # plan, and the random sampler only records the fixed values of enqueued trials
        seed, samplers = identity["settings"]["seed"], optuna.samplers
        sampler = (samplers.NSGAIISampler(seed=seed, population_size=8) if self.sampler == "nsga2"
                   else samplers.TPESampler(seed=seed) if self.sampler == "tpe"
                   else samplers.RandomSampler(seed=seed))
        try:
            self.study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                             directions=self.directions)
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            self._check(name, identity)
        else:
            self._set_up(identity)
        self.deadline = self.study.user_attrs.get("deadline") or 0.0
        if self.deadline < time.time():  # a new session of this study
            self.deadline = time.time() + self.budget_seconds
            self.study.set_user_attr("deadline", self.deadline)

    def _storage(self, url: str) -> Any:
        """With heartbeats: a trial whose worker died is failed after the grace period and
        enqueued again (``RetryFailedTrialCallback``), so another worker runs it."""
        from optuna.storages import RDBStorage, RetryFailedTrialCallback

        # SQLite: wait for the other workers' writes instead of failing on a locked file
        engine = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                  else {"pool_pre_ping": True})
        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # heartbeats are "experimental" to Optuna
                    warnings.simplefilter("ignore")
                    return RDBStorage(url, engine_kwargs=engine,
                                      heartbeat_interval=max(1, round(self.heartbeat)),
                                      grace_period=max(2, round(3 * self.heartbeat)),
                                      heartbeat_stale_trial_callback=RetryFailedTrialCallback(
                                          max_retry=3))
            except Exception as exc:
                # another worker is creating the tables at the same time (PostgreSQL says
                # DuplicateTable, a ProgrammingError; SQLite a locked or integrity error)
                racing = type(exc).__name__ in ("OperationalError", "IntegrityError") or (
                    type(exc).__name__ == "ProgrammingError" and "already exists" in str(exc))
                if attempt < 4 and racing:
                    time.sleep(0.5)
                    continue
                driver = ("; its database driver is not installed (for PostgreSQL: pip install "
                          "'inferopt[postgres]')" if isinstance(exc, ImportError) else "")
                raise UsageError(f"study storage {url.split('://')[0]}://...: cannot open it "
                                 f"({type(exc).__name__}: {exc}){driver}") from exc
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _set_up(self, identity: dict[str, Any]) -> None:
        """The study's attributes (the schema first: what tells it from another program's),
        its first trials, then ``ready``. A worker that finds a study its creator left half set
        up (a kill) finishes the setup: only the attributes not there yet."""
        have = self.study.user_attrs
        for key, value in {"schema": SCHEMA, **identity, "machine": self.machine}.items():
            if key not in have:
                self.study.set_user_attr(key, value)
        self._enqueue(self.plan(self.trials()))  # a key already enqueued is not again
        self.study.set_user_attr("ready", True)  # the others wait for this

    def _check(self, name: str, identity: dict[str, Any]) -> None:
        wait = time.monotonic() + SETUP_WAIT
        while not self.study.user_attrs.get("ready") and not foreign(self.study):
            if time.monotonic() > wait:  # its creator stopped before it was ready
                have = self.study.user_attrs
                mine = {**identity, "machine": self.machine}
                if clash := [k for k in mine if k in have and have[k] != mine[k]]:
                    raise UsageError(f"study {name!r} was left half set up by a worker of "
                                     f"another search (differing: {', '.join(clash)}); use "
                                     "another --study/--out, or --restart to discard it")
                self.echo(f"study {name!r} was left half set up (its worker stopped); "
                          "finishing its setup here")
                self._set_up(identity)
                break
            time.sleep(0.1)  # the creator is still setting the study up
        theirs = self.study.user_attrs
        if theirs.get("schema") != SCHEMA:
            raise UsageError(f"study {name!r} is not an inferopt tune study (or one of another "
                             "version); use another --study or --out")
        if theirs.get("fingerprint") != identity["fingerprint"]:
            old, new = theirs.get("settings", {}), identity["settings"]
            changed = [k for k in new if old.get(k) != new[k]] or ["the baseline model's "
                                                                   "weights or data"]
            raise UsageError(f"study {name!r} holds a tune of a different baseline (changed: "
                             f"{', '.join(changed)}); its trials cannot be reused. Choose "
                             "another --out/--study, or --restart to discard them")
        for key, flag in (("goal", "--objective/--max-accuracy-drop/--min-cosine"),
                          ("space", "--technique"), ("sampler", "--sampler"),
                          ("backends", "--try-backend")):
            # a study from before --sampler was made with NSGA-II, one before --try-backend
            # tried none
            if (old := theirs.get(key, {"sampler": "nsga2", "backends": []}.get(key))) != \
                    identity[key]:
                raise UsageError(f"study {name!r} searches another {key} ({flag}: {old}, here "
                                 f"{identity[key]}); give the same flags, or use another "
                                 "--study/--out")
        old, mine = theirs.get("machine", {}), self.machine
        diffs = [f"{k} {old.get(k)!r} here {mine[k]!r}"
                 for k in ("cpu", "cores", "gpu", "torch") if old.get(k) != mine[k]]
        a, b = set(old.get("cpu_flags", [])), set(mine["cpu_flags"])
        if a != b:
            diffs.append(f"CPU flags (only the study's: {' '.join(sorted(a - b)[:8]) or '-'}; "
                         f"only here: {' '.join(sorted(b - a)[:8]) or '-'})")
        if diffs:
            raise UsageError(f"study {name!r} was measured on another kind of machine, so its "
                             f"timings do not compare with this one's: {'; '.join(diffs)}. Run "
                             "this worker on a machine like the study's, or use another --study")

    def _enqueue(self, plan: list[Trial]) -> None:
        for item in plan:
            self.study.enqueue_trial(self._params(item["steps"], item.get("backend")) or {},
                                     user_attrs=item)

    def trials(self) -> list[Trial]:
        return [attrs_of(t) for t in self.study.get_trials(deepcopy=False)]

    # -- the plan: what to enqueue ahead of the sampler ---------------------------------------

    def plan(self, trials: list[Trial]) -> list[Trial]:
        """The next trials to enqueue (as user attributes: key, phase, steps); the same trials
        give the same plan, and a key already taken is never enqueued again."""
        keys = taken_keys(trials)
        # the space is in KIND_RANK order: cheap kinds first, training ones last; then each
        # --try-backend: the model as it is, then each technique
        wanted = [planned([], "baseline")] + [
            planned([t.points()[0]] if t else [], "single", b)
            for b in self.where for t in ([] if b is None else [None]) + self.space]
        if (todo := self._wait_for(wanted, keys)) is not None:
            return todo
        for backend, tech in itertools.product(self.where, self.space):
            if (step := self._fallback(tech, backend, keys)) is not None:
                return step
        self.decisions = []
        pairs = [p for p in self._pairs(keys) if p["key"] not in keys]
        if pairs or self.sampler != "grid":
            return pairs
        # grid: the next point in the space's order, once nothing before it is left to plan
        # or waits for a trial (so that any number of workers plans the same trials)
        point = self._unvisited(keys)
        return [point] if point else []

    @staticmethod
    def _wait_for(runs: list[Trial], keys: dict[str, Trial]) -> list[Trial] | None:
        """Those of ``runs`` to enqueue (maybe none: the others run) while some are not done;
        None once all are."""
        todo = [r for r in runs if r["key"] not in keys]
        return todo if todo or any(not done(keys[r["key"]]) for r in runs) else None

    def _builds_on(self, t: Trial) -> bool:
        """A measured trial the plan builds on; with grid, not the grid's own points, so that
        the plan never depends on which of them finished first."""
        return done(t) and not (self.sampler == "grid" and t.get("phase") == "search")

    def _fallback(self, tech: Technique, backend: str | None,
                  keys: dict[str, Trial]) -> list[Trial] | None:
        """Per-layer sensitivity: the technique improves the objective but breaks the budget;
        leave out one layer at a time, then keep the 1, 2, 4, ... most sensitive in float.
        None when there is nothing (more) to do for it; else what to enqueue (maybe nothing
        while the trials it waits for run)."""
        if "skip" not in tech.defaults or len(self.layers) < 2:
            return None
        mine = [t for t in keys.values() if self._builds_on(t) and t.get("phase") not in NOT_COUNTED
                and [s["name"] for s in t["steps"]] == [tech.name]
                and t.get("backend") == backend]
        worth = [t for t in mine if t.get("improves") and not self.goal.within(t)
                 and t.get("phase") != "sensitivity-retry"]
        if any(self.goal.meets(t) for t in mine) or not worth:
            return None
        start = min(worth, key=lambda t: (self.goal.excess(t), t["number"]))
        opts = dict(start["steps"][0]["options"])
        before = list(opts.get("skip") or [])
        layers = [n for n in self.layers if n not in before][:MAX_SENSITIVITY_LAYERS]
        runs = [planned([{"name": tech.name, "options": {**opts, "skip": [*before, n]}}],
                        "sensitivity", backend, layer=n, of=start["key"]) for n in layers]
        if (todo := self._wait_for(runs, keys)) is not None:
            return todo
        start_drop = self.goal.drop(start) or 0.0
        gain = {r["layer"]: start_drop - (self.goal.drop(keys[r["key"]]) or 0.0) for r in runs
                if keys[r["key"]].get("status") == "ok"}
        ranked = sorted(gain, key=lambda n: -gain[n])
        most = min(len(ranked), len(layers) - 1)  # never all of them: that is the baseline
        for k in sorted({*(2 ** i for i in range(most.bit_length())), most} - {0}):
            retry = planned([{"name": tech.name, "options": {**opts, "skip": before + ranked[:k]}}],
                            "sensitivity-retry", backend)
            if (todo := self._wait_for([retry], keys)) is not None:
                return todo  # its turn, or wait for it
            if self.goal.within(keys[retry["key"]]):
                break
        return None

    def _pairs(self, keys: dict[str, Trial]) -> list[Trial]:
        """Pairs of the techniques' best single candidates that meet the goal, structural
        techniques first, best predicted first; pairs predicted to break the budget are
        recorded in ``decisions`` instead."""
        g = self.goal
        best: dict[tuple[str, str | None], Trial] = {}  # (technique, backend): its best
        for t in sorted((t for t in keys.values() if self._builds_on(t) and g.meets(t)
                         and len(t["steps"]) == 1),
                        key=lambda t: (-g.excess(t), t["objective"] or -math.inf)):
            best[t["steps"][0]["name"], t.get("backend")] = t
        rank = {tech.name: COMBINE_RANK.get(tech.kind, COMBINE_RANK[""]) for tech in self.space}
        plans = []
        for ((a_name, where), a), ((b_name, b_where), b) in itertools.permutations(
                best.items(), 2):
            if rank[a_name] >= rank[b_name] or where != b_where:  # pairs on one backend
                continue
            pair = planned(a["steps"] + b["steps"], "combine", where)
            drop = max(g.drop(a) or 0.0, 0.0) + max(g.drop(b) or 0.0, 0.0)
            if drop <= g.budget + EPSILON:
                plans.append(((a["objective"] or 0.0) * (b["objective"] or 0.0), pair))
            elif pair["key"] not in keys:
                self.decisions.append({"candidate": pair["key"], "decision": "skipped",
                                       "reason": f"predicted {g.quality} drop {drop:.3g} (sum of "
                                                 f"the two steps') exceeds the budget "
                                                 f"{g.budget:g}"})
        return [p for _v, p in sorted(plans, key=lambda p: -p[0])]

    def _unvisited(self, keys: dict[str, Trial]) -> Trial | None:
        """The first point of the space not measured yet (what replaces a repeated sample)."""
        return next((planned([step], "search", b) for b in self.where for tech in self.space
                     for step in tech.points() if key_of([step], b) not in keys), None)

    def run_args(self, backend: str | None) -> dict[str, Any]:
        """``session.run``'s arguments for a trial on ``backend`` (None: the baseline's)."""
        if backend is None:
            return self.inputs
        return {**self.inputs, "backend": backend, "baseline_backend": self.inputs["backend"]}

    @property
    def where(self) -> list[str | None]:
        """The backends candidates run on: the baseline's (None), then each --try-backend."""
        return [None, *self.backends]

    def _params(self, steps: list[dict[str, Any]], backend: str | None) -> dict[str, Any] | None:
        """A single-technique point as sampler parameters (None for other recipes)."""
        tech = next((t for t in self.space if len(steps) == 1 and t.name == steps[0]["name"]),
                    None)
        if tech is None or set(steps[0]["options"]) - set(tech.dims) - set(tech.fixed):
            return None
        values = {**tech.defaults, **steps[0]["options"]}
        on = {"backend": backend or self.inputs["backend"]} if self.backends else {}
        return {"technique": tech.name, **on,
                **{f"{tech.name}.{d}": values[d] for d in tech.dims}}

    def _sample(self, trial: Any) -> tuple[list[dict[str, Any]], str | None]:
        """The sampler's point: a technique, then a value of each of its searchable options,
        and (with --try-backend) the backend (None: the baseline's)."""
        name = trial.suggest_categorical("technique", [t.name for t in self.space])
        tech = next(t for t in self.space if t.name == name)
        base = self.inputs["backend"]
        backend = trial.suggest_categorical("backend", [base, *self.backends]) \
            if self.backends else base
        return [tech.step({d: trial.suggest_categorical(f"{name}.{d}", values)
                           for d, values in tech.dims.items()})], \
            None if backend == base else backend

    # -- the loop -----------------------------------------------------------------------------

    def work(self) -> None:
        from optuna.storages import fail_stale_trials

        while True:
            trials = self.trials()
            base = next((t for t in trials if t.get("phase") == "baseline" and done(t)), None)
            if base is not None and base.get("status") != "ok":
                raise UsageError(f"the baseline itself could not be measured: {base['error']}")
            stop = self._limit(trials, base is not None)
            if stop is None:
                self._enqueue(self.plan(trials))
                trials = self.trials()
                # nothing waiting: the whole space is measured (or being measured); or, with
                # grid, the plan waits for running trials (below)
                if not any(t["state"] == "WAITING" for t in trials) and (
                        self.sampler == "grid" or self._unvisited(taken_keys(trials)) is None):
                    stop = ""
            if stop is not None:
                if any(t["state"] == "RUNNING" for t in trials):
                    # another worker's trial: wait for it; a dead worker's is failed after
                    # the grace period and enqueued again, so it runs here
                    time.sleep(min(self.heartbeat, 1.0))
                    with warnings.catch_warnings():  # "experimental" to Optuna
                        warnings.simplefilter("ignore")
                        fail_stale_trials(self.study)
                    continue
                self.stopped = stop or None
                return
            try:
                self.study.optimize(self._objective, n_trials=1, catch=(TrialFailed,))
            except ValueError as exc:
                # Optuna could not record the trial: it was finished meanwhile, as when another
                # worker took its heartbeat for stale under heavy load and failed it (and its
                # retry may run again). The study stays consistent: plan again from it
                if not str(exc).startswith("Cannot tell"):
                    raise
                self.echo(f"a trial could not be recorded ({exc}); the study has it as "
                          "another worker left it, going on")

    def _limit(self, trials: list[Trial], started: bool) -> str | None:
        if len({t["key"] for t in trials if counted(t)}) >= self.max_trials:
            return f"trial limit reached ({self.max_trials} trials)"
        if not started:
            return None  # the A/A baseline runs whatever the time budget
        # the next trial's length: from the trials of the same techniques so far (else the
        # median trial); and time kept back for saving the choice, which reruns it
        ok = [t for t in trials if t["state"] == "COMPLETE" and isinstance(t.get("seconds"), float)]
        median = statistics.median_low([t["seconds"] for t in ok]) if ok else 0.0
        waiting = next((t.get("steps") or [] for t in trials if t["state"] == "WAITING"), [])
        names = {s["name"] for s in waiting}
        estimate = max((t["seconds"] for t in ok
                        if names & {s["name"] for s in t.get("steps") or []}), default=median)
        reserve = max((t["seconds"] for t in ok if self.goal.meets(t)), default=median)
        if time.time() + estimate + reserve + self.load_seconds > self.deadline:
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

        item, trials = dict(trial.user_attrs), self.trials()
        if "steps" not in item and self.sampler == "grid":
            self._skip(trial, "no trial waiting")  # claimed by another worker: plan again
        if "steps" not in item:
            # the sampler's proposal is enqueued, not run: an enqueued trial carries its key
            # from its creation and is claimed atomically, so the lowest-numbered trial of a
            # key is the one that runs (below), whichever workers plan or sample it
            (steps, backend), keys = self._sample(trial), taken_keys(trials)
            nxt = (planned(steps, "search", backend) if key_of(steps, backend) not in keys
                   else self._unvisited(keys))  # a repeat: something new
            self._enqueue([nxt] if nxt else [])
            self._skip(trial, "sampler proposal, enqueued" if nxt else "sampler repeat")
        if self._params(item["steps"], item.get("backend")) is not None:
            self._sample(trial)  # the sampler learns from it (the values are fixed)
        # a trial of the same key measured, or running or waiting since before this one
        dup = next((t for t in trials if t.get("key") == item["key"] and taken(t)
                    and t["number"] != trial.number and (done(t) or t["number"] < trial.number)),
                   None)
        if dup is not None:
            self._skip(trial, f"duplicate of trial {dup['number']}")
        # recipes, not trials: a duplicate not skipped yet must not take this trial's place
        before = {t["key"] for t in trials if counted(t) and t["number"] < trial.number}
        if item["phase"] not in NOT_COUNTED and len(before) >= self.max_trials:
            self._skip(trial, "trial limit")
        # one write per attribute: the trial's own (sampled ones), then who runs it where
        trial.set_user_attr("run", {**item, "worker": f"{socket.gethostname()}:{os.getpid()}",
                                    "machine": self.machine})
        self.mine.add(trial.number)
        started = time.monotonic()
        try:
            # a trial that wrecks the model is scored by the accuracy budget, not refused
            report = self.session.run(
                optimize=[spec_text(s["name"], s["options"]) for s in item["steps"]],
                metrics=[self.goal.measure] if item["phase"] == "sensitivity" else self.metrics,
                allow_collapse=True, save=False, **self.run_args(item.get("backend")))
        except (KeyboardInterrupt, Interrupted):  # the pipeline turns Ctrl-C into Interrupted
            trial.set_user_attr("interrupted", True)  # FAIL without a status: runs again
            raise KeyboardInterrupt from None
        except BaseException as exc:  # a broken plugin (even sys.exit) costs its own trial only
            error = str(exc) if isinstance(exc, InferoptError) else f"{type(exc).__name__}: {exc}"
            rec: Trial = {"status": "failed", "error": error}
        else:
            rec = record(report, self.goal)
        rec["seconds"] = round(time.monotonic() - started, 3)
        if trial.number not in {t.number for t in self.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}:
            # another worker failed it as stale meanwhile (a late heartbeat) and a retry of
            # it is enqueued: this result is not the study's (Optuna cannot record it)
            self.echo(f"trial {trial.number} [{item['phase']}] {item['key']}: finished by "
                      "another worker while it ran (its heartbeat was late); not recorded")
            raise TrialFailed("finished by another worker while it ran")
        trial.set_user_attr("result", rec)
        self.echo(f"trial {trial.number} [{item['phase']}] {item['key']}: "
                  f"{self.goal.describe(rec)}")
        if rec["status"] != "ok":
            raise TrialFailed(rec["error"])
        if item["phase"] == "sensitivity":
            raise optuna.TrialPruned("accuracy-only sensitivity run")
        drop = self.goal.drop(rec)
        trial.set_constraint("accuracy_budget", 1e9 if drop is None else drop - self.goal.budget)
        size = [] if self.goal.metric == "size" else [rec.get("size_ratio") or 1.0]
        return [rec["objective"] or 0.0, *size, 1e9 if drop is None else drop]
