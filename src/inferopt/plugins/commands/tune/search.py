"""The search: the space, the goal, what to enqueue ahead of the sampler, and one trial.

A trial is one recipe (optimizer steps with their options) run with :meth:`inferopt.Session.run`
on the baseline loaded once per worker; it is keyed by its recipe, so that no recipe is enqueued
or run twice whichever worker plans it (the worker loop is in :mod:`.study`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import attrs

from inferopt import Interrupted, UsageError
from inferopt.utils import cpu_flags, iter_tensors, weights_bytes

# the order techniques are tried in and combined in: structural changes before quantization
KIND_RANK = {"quantization": 0, "pruning": 1, "": 2, "distillation": 3}
COMBINE_RANK = {"distillation": 0, "pruning": 1, "": 2, "quantization": 3}
MAX_SENSITIVITY_LAYERS = 32
MIN_GAIN = 0.02  # smallest gain called an improvement for a timed quantity without a CI
TIMED_UNITS = ("ms", "s", "samples/s")
EPSILON = 1e-9
NOT_COUNTED = ("baseline", "sensitivity")


class TrialFailed(Exception):
    """A trial's step raised: the trial fails alone (recorded), the search goes on."""


def spec_text(name: str, options: dict[str, Any]) -> str:
    """``NAME[:k=v,...]`` as ``--optimize`` takes it (lists joined with ``|``)."""
    def fmt(v: Any) -> str:
        if isinstance(v, list | tuple):
            return "|".join(map(str, v))
        return str(v).lower() if isinstance(v, bool) else str(v)
    opts = ",".join(f"{k}={fmt(v)}" for k, v in sorted(options.items()))
    return f"{name}:{opts}" if opts else name


def key_of(steps: list[dict[str, Any]]) -> str:
    return " + ".join(spec_text(s["name"], s["options"]) for s in steps) or "none"


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
    has_skip: bool

    def step(self, values: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.fixed, **values}
        return {"name": self.name, "options": {k: v for k, v in merged.items()
                                               if k in self.fixed or self.defaults.get(k) != v}}

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the searchable values, as steps (the default first)."""
        combos: list[dict[str, Any]] = [{}]
        for name, values in self.dims.items():
            combos = [{**c, name: v} for c in combos for v in values]
        return [self.step(c) for c in combos]

    def to_json(self) -> dict[str, Any]:
        return {"technique": self.name, **attrs.asdict(self, filter=lambda a, _v: a.name in (
            "kind", "plugin", "distribution", "fixed")), "search": self.dims,
            "skip_option": self.has_skip}


def search_space(session: Any, techniques: tuple[Any, ...]) -> tuple[list[Technique], list[str]]:
    """The techniques to search, and notes on searchable values a plugin itself rejects.
    Without ``techniques`` (``parse_spec`` results), every installed optimizer that declares
    searchable values (``inferopt.option(..., searchable=...)``); a spec's options are fixed."""
    names = [s.name for s in techniques]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"--technique {', '.join(twice)} is given twice; give each technique "
                         "once (fix options with NAME:key=value)")
    from inferopt.utils import parse_spec

    techniques = techniques or tuple(
        parse_spec(n, "-t") for n in session.names("optimizer")
        if any(o.get("searchable") for o in session.describe("optimizer", n)["options"]))
    if not techniques:
        raise UsageError("no installed optimizer declares searchable options; name the "
                         "techniques to try with --technique NAME")
    notes: list[str] = []
    space = []
    for spec in techniques:
        info = session.describe("optimizer", spec.name)  # an unknown name is a UsageError
        instance = session.optimizer(spec.name, **spec.options)  # checks the fixed options
        described = {o["name"]: o for o in info["options"]}
        fixed = {k.replace("-", "_"): getattr(instance, k.replace("-", "_")) for k in spec.options}
        fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in fixed.items()}
        dims: dict[str, list[Any]] = {}
        for name, o in described.items():
            values = [o["default"]]
            for value in o.get("searchable") or () if name not in fixed else ():
                try:
                    session.optimizer(spec.name, **{**spec.options, name: value})
                except UsageError as exc:
                    notes.append(f"{spec.name}: searchable value {name}={value!r} left out "
                                 f"(plugin {info['plugin']!r} declares a value it rejects: {exc})")
                    continue
                values += [value] if value not in values else []
            if len(values) > 1:
                dims[name] = values
        kind = str(getattr(session.optimizer_class(spec.name), "kind", "") or "")
        space.append(Technique(spec.name, kind, info["plugin"], info["distribution"],
                               {n: o["default"] for n, o in described.items()}, fixed, dims,
                               "skip" in described))
    space.sort(key=lambda t: (KIND_RANK.get(t.kind, KIND_RANK[""]), t.name))
    return space, notes


def machine() -> dict[str, Any]:
    """What a trial's timings depend on: the CPU and its flags, the GPU, torch."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": sorted(cpu_flags()),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def machine_mismatch(study_machine: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """What differs between the study's machine and this one, in words (None: the same)."""
    diffs = [f"{key} {study_machine.get(key)!r} here {mine.get(key)!r}"
             for key in ("cpu", "cores", "gpu", "torch") if study_machine.get(key) != mine.get(key)]
    theirs, ours = set(study_machine.get("cpu_flags", [])), set(mine.get("cpu_flags", []))
    if theirs != ours:
        diffs.append(f"CPU flags (only the study's: {' '.join(sorted(theirs - ours)[:8]) or '-'}"
                     f"; only here: {' '.join(sorted(ours - theirs)[:8]) or '-'})")
    return "; ".join(diffs) or None


def fingerprint(model: Any, data: Any, settings: dict[str, Any]) -> str:
    """A hash of the baseline: its weights, every sample of the data, the settings."""
    import torch

    digest = hashlib.sha256(weights_bytes(model))
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for split in (data.eval, data.calibration, data.train):
        for batch in split:
            for tensor in iter_tensors((batch.inputs, batch.labels)):
                digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
                raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:16]


def weighted_layers(model: Any) -> list[str]:
    """Leaf modules with a weight matrix or kernel: what quantizers and pruners act on."""
    import torch

    return [name for name, m in model.named_modules()
            if name and not list(m.children())
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.dim() >= 2]


@attrs.frozen
class Goal:
    """The accuracy budget and the objective: ``metric`` (its ``field``, default its primary
    quantity), better ``lower`` or ``higher`` as the metric describes it."""

    budget: float
    relative: bool
    metric: str
    field: str | None = None

    @classmethod
    def parse(cls, objective: str, budget: float, relative: bool) -> Goal:
        metric, _dot, field = objective.partition(".")
        return cls(budget, relative, metric, field or None)

    def drop(self, t: dict[str, Any]) -> float | None:
        value = t.get("accuracy_drop_percent" if self.relative else "accuracy_drop_points")
        return float(value) if isinstance(value, int | float) else None

    def within(self, t: dict[str, Any]) -> bool:
        drop = self.drop(t)
        return t.get("status") == "ok" and drop is not None and drop <= self.budget + EPSILON

    def excess(self, t: dict[str, Any]) -> float:
        drop = self.drop(t)
        return math.inf if drop is None else max(0.0, drop - self.budget)

    def meets(self, t: dict[str, Any]) -> bool:
        return self.within(t) and bool(t.get("improves")) and bool(t.get("steps"))

    def value(self, t: dict[str, Any]) -> float | None:
        v = t.get("objective")
        return float(v) if isinstance(v, int | float) else None

    def rank(self, t: dict[str, Any]) -> tuple[bool, bool, float, float]:
        """Meets the goal, then within the budget, then closest to it, then the objective."""
        return self.meets(t), self.within(t), -self.excess(t), self.value(t) or -math.inf

    def text(self) -> str:
        budget = (f"{self.budget:g}% of the baseline's accuracy" if self.relative
                  else f"{self.budget:g} points")
        what = f"{self.metric}.{self.field}" if self.field else self.metric
        return (f"accuracy drop <= {budget} and better {what} than the baseline (a paired "
                f"metric: its confidence interval; else by more than its noise)")

    def judge(self, report: Any) -> tuple[float | None, bool]:
        """(how many times better than the baseline, whether that is an improvement) of the
        objective in ``report``, from the metric's own description of its quantities."""
        desc = report.descriptions.get(self.metric)
        if desc is None:
            raise UsageError(f"--objective {self.metric!r}: no metric {self.metric!r} was "
                             f"measured; metrics: {', '.join(sorted(report.descriptions))}")
        field = self.field or desc.get("primary")
        quantity = desc.get("quantities", {}).get(field)
        if quantity is None or quantity.get("better") not in ("lower", "higher"):
            directed = [f"{self.metric}.{k}" for k, q in desc.get("quantities", {}).items()
                        if q.get("better") in ("lower", "higher") and not k.endswith("*")]
            raise UsageError(f"--objective {self.metric}.{field}: not a quantity with a "
                             f"direction; use one of {', '.join(directed) or '(none)'}")
        paired = report.comparisons.get(self.metric, {})
        if field == desc.get("primary") and isinstance(paired.get("speedup"), int | float):
            return float(paired["speedup"]), paired.get("verdict") in ("faster", "better")
        b = report.baseline.get(self.metric, {}).get(field)
        o = report.optimized.get(self.metric, {}).get(field)
        if not all(isinstance(x, int | float) and x > 0 for x in (b, o)):
            return None, False
        ratio = b / o if quantity["better"] == "lower" else o / b
        margin = MIN_GAIN if quantity.get("unit") in TIMED_UNITS else 0.0
        same = float(quantity.get("same_within") or 0.0)
        return ratio, ratio > 1.0 + margin and abs(o - b) > same


def record(report: Any, goal: Goal, started: float) -> dict[str, Any]:
    """A finished trial's numbers, as the study keeps them (user attributes)."""
    v = report.verdict
    value, improves = goal.judge(report) if "accuracy" in report.baseline and \
        goal.metric in report.descriptions else (None, False)
    doc = report.to_dict()
    doc.pop("environment", None)  # kept once, with the study's machine
    return {"status": "ok", "speedup": v.get("speedup"), "speedup_ci": v.get("speedup_ci"),
            "latency_verdict": v.get("latency"),
            "accuracy_drop_points": v.get("accuracy_drop_points"),
            "accuracy_drop_percent": v.get("accuracy_drop_percent"),
            "size_ratio": v.get("size_ratio"), "objective": value, "improves": improves,
            "accuracy": report.optimized.get("accuracy", {}).get("top1"),
            "step_seconds": sum(s.seconds for s in report.steps),
            "summaries": [s.details.get("summary", "") for s in report.steps],
            "warnings": report.warnings, "seconds": round(time.monotonic() - started, 3),
            "report": doc}


def attrs_of(trial: Any) -> dict[str, Any]:
    """A study trial as the search reads it: its user attributes (``key``, ``phase``,
    ``steps``; ``run``: who ran it where; ``result``: what it measured) in one dict, with its
    number and state."""
    ua = trial.user_attrs
    return {**{k: v for k, v in ua.items() if k not in ("run", "result")}, **ua.get("run", {}),
            **ua.get("result", {}), "number": trial.number, "state": trial.state.name}


def done(t: dict[str, Any]) -> bool:
    """Measured (or failed by its own step): what counts and what plans build on."""
    return (t["state"] == "COMPLETE" or (t["state"] == "FAIL" and t.get("status") == "failed")
            or (t["state"] == "PRUNED" and t.get("phase") == "sensitivity"
                and "status" in t))


def taken(t: dict[str, Any]) -> bool:
    """Holds its key: measured, running or waiting (not skipped, not interrupted)."""
    return done(t) or (t["state"] in ("RUNNING", "WAITING") and "skipped" not in t)


def counted(t: dict[str, Any]) -> bool:
    """Counts against --trials: a candidate measured or being measured."""
    return "key" in t and t.get("phase") not in NOT_COUNTED and "skipped" not in t \
        and (done(t) or t["state"] == "RUNNING")


def planned(steps: list[dict[str, Any]], phase: str, **extra: Any) -> dict[str, Any]:
    """A trial to enqueue, as its user attributes."""
    return {"key": key_of(steps), "phase": phase, "steps": steps, **extra}


class Planner:
    """What to enqueue next, from the trials in the study; the same trials give the same
    plan, so workers agree, and a key already taken is never enqueued again."""

    def __init__(self, space: list[Technique], goal: Goal, layers: list[str]) -> None:
        self.space, self.goal, self.layers = space, goal, layers
        self.decisions: list[dict[str, Any]] = []

    def plan(self, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The next trials to enqueue (as user attributes: key, phase, steps)."""
        keys = {t["key"]: t for t in trials if "key" in t and taken(t)}
        # the space is in KIND_RANK order: cheap kinds first, training ones last
        wanted = [planned([], "baseline")] + [planned([t.points()[0]], "single")
                                                  for t in self.space]
        missing = [w for w in wanted if w["key"] not in keys]
        if missing or any(not done(keys[w["key"]]) for w in wanted):
            return missing
        for tech in self.space:
            if (step := self._fallback(tech, keys)) is not None:
                return step
        self.decisions = []
        return [p for p in self._pairs(keys) if p["key"] not in keys]

    def _fallback(self, tech: Technique, keys: dict[str, dict[str, Any]]
                  ) -> list[dict[str, Any]] | None:
        """Per-layer sensitivity: the technique improves the objective but breaks the budget;
        leave out one layer at a time, then keep the 1, 2, 4, ... most sensitive in float.
        None when there is nothing (more) to do for it; else what to enqueue (maybe nothing
        while the trials it waits for run)."""
        if not tech.has_skip or len(self.layers) < 2:
            return None
        mine = [t for t in keys.values() if done(t) and t.get("phase") not in NOT_COUNTED
                and [s["name"] for s in t["steps"]] == [tech.name]]
        if any(self.goal.meets(t) for t in mine):
            return None
        worth = [t for t in mine if t.get("improves") and not self.goal.within(t)
                 and t.get("phase") != "sensitivity-retry"]
        if not worth:
            return None
        start = min(worth, key=lambda t: (self.goal.excess(t), t["number"]))
        opts = dict(start["steps"][0]["options"])
        before = list(opts.get("skip") or [])
        layers = [n for n in self.layers if n not in before][:MAX_SENSITIVITY_LAYERS]
        runs = [planned([{"name": tech.name, "options": {**opts, "skip": [*before, n]}}],
                            "sensitivity", layer=n, of=start["key"]) for n in layers]
        runs = [dict(r, key=r["key"] + " (accuracy only)") for r in runs]
        todo = [r for r in runs if r["key"] not in keys]
        if todo or any(not done(keys[r["key"]]) for r in runs):
            return todo
        start_drop = self.goal.drop(start) or 0.0
        gain = {r["layer"]: start_drop - (self.goal.drop(keys[r["key"]]) or 0.0) for r in runs
                if keys[r["key"]].get("status") == "ok"}
        ranked = sorted(gain, key=lambda n: -gain[n])
        most = min(len(ranked), len(layers) - 1)  # never all of them: that is the baseline
        for k in sorted({*(2 ** i for i in range(most.bit_length())), most} - {0}):
            retry = planned([{"name": tech.name,
                                  "options": {**opts, "skip": before + ranked[:k]}}],
                                "sensitivity-retry")
            t = keys.get(retry["key"])
            if t is None:
                return [retry]
            if not done(t):
                return []
            if self.goal.within(t):
                return None
        return None

    def _pairs(self, keys: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Pairs of the techniques' best single candidates that meet the goal, structural
        techniques first, best predicted first; pairs predicted to break the budget or to be
        dominated by a measured trial are recorded in ``decisions`` instead."""
        best: dict[str, dict[str, Any]] = {}
        for t in sorted((t for t in keys.values() if done(t) and self.goal.meets(t)
                         and len(t["steps"]) == 1), key=self.goal.rank):
            best[t["steps"][0]["name"]] = t
        rank = {tech.name: COMBINE_RANK.get(tech.kind, COMBINE_RANK[""]) for tech in self.space}
        plans = []
        for a_name, a in best.items():
            for b_name, b in best.items():
                if rank.get(a_name, 2) >= rank.get(b_name, 2):
                    continue
                pair = planned(a["steps"] + b["steps"], "combine")
                drop = max(self.goal.drop(a) or 0.0, 0.0) + max(self.goal.drop(b) or 0.0, 0.0)
                value = (self.goal.value(a) or 0.0) * (self.goal.value(b) or 0.0)
                reason = None
                if drop > self.goal.budget + EPSILON:
                    reason = (f"predicted accuracy drop {drop:.3g} (sum of the two steps') "
                              f"exceeds the budget {self.goal.budget:g}")
                else:
                    dom = next((t for t in keys.values() if done(t) and t.get("status") == "ok"
                                and t.get("phase") not in NOT_COUNTED
                                and (self.goal.value(t) or -math.inf) >= value
                                and (self.goal.drop(t) or 0.0) <= drop), None)
                    if dom is not None:
                        reason = (f"predicted point (objective {value:.3g}, drop {drop:.3g}) "
                                  f"is dominated by trial {dom['number']} ({dom['key']})")
                if reason and pair["key"] not in keys:
                    self.decisions.append({"candidate": pair["key"], "decision": "skipped",
                                           "reason": reason})
                elif not reason:
                    plans.append((value, pair))
        return [p for _v, p in sorted(plans, key=lambda p: -p[0])]

    def unvisited(self, keys: set[str]) -> dict[str, Any] | None:
        """The first point of the space not measured yet (what replaces a repeated sample)."""
        for tech in self.space:
            for step in tech.points():
                if key_of([step]) not in keys:
                    return planned([step], "search")
        return None


def params_of(space: list[Technique], steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A single-technique point as sampler parameters (None for other recipes)."""
    tech = next((t for t in space if len(steps) == 1 and t.name == steps[0]["name"]), None)
    if tech is None or set(steps[0]["options"]) - set(tech.dims) - set(tech.fixed):
        return None
    values = {**tech.defaults, **steps[0]["options"]}
    return {"technique": tech.name, **{f"{tech.name}.{d}": values[d] for d in tech.dims}}


def sample(trial: Any, space: list[Technique]) -> list[dict[str, Any]]:
    """The sampler's point: a technique, then a value of each of its searchable options."""
    name = trial.suggest_categorical("technique", [t.name for t in space])
    tech = next(t for t in space if t.name == name)
    return [tech.step({d: trial.suggest_categorical(f"{name}.{d}", values)
                       for d, values in tech.dims.items()})]


def run_trial(session: Any, inputs: dict[str, Any], steps: list[dict[str, Any]],
              metrics: list[str], goal: Goal) -> dict[str, Any]:
    """Run one recipe on the loaded baseline; a failing step raises :class:`TrialFailed` with
    the record (``status: failed`` and the error) as its argument."""
    from inferopt import InferoptError

    started = time.monotonic()
    try:
        # a trial that wrecks the model is scored by the accuracy budget, not refused
        report = session.run(optimize=[spec_text(s["name"], s["options"]) for s in steps],
                             metrics=metrics, allow_collapse=True, save=False, **inputs)
    except KeyboardInterrupt:
        raise
    except Interrupted:  # the pipeline turns Ctrl-C into this: stop the search, not a trial
        raise KeyboardInterrupt from None
    except InferoptError as exc:
        error = str(exc)
    except BaseException as exc:  # a broken plugin (even sys.exit) costs its own trial only
        error = f"{type(exc).__name__}: {exc}"
    else:
        return record(report, goal, started)
    raise TrialFailed({"status": "failed", "error": error,
                       "seconds": round(time.monotonic() - started, 3)})


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def estimate_seconds(trials: list[dict[str, Any]], steps: list[dict[str, Any]] | None,
                     goal: Goal, load_seconds: float) -> tuple[float, float]:
    """(the next trial's length, time kept back for saving the choice): from the trials of
    the same techniques so far (else the median trial); saving reruns the chosen recipe."""
    ok = [t for t in trials if t["state"] == "COMPLETE" and isinstance(t.get("seconds"), float)]
    median = statistics.median_low([t["seconds"] for t in ok]) if ok else 0.0
    names = {s["name"] for s in steps or []}
    same = [t["seconds"] for t in ok if names & {s["name"] for s in t.get("steps") or []}]
    reserve = max((t["seconds"] for t in ok if goal.meets(t)), default=median) + load_seconds
    return max(same, default=median), reserve


Echo = Callable[[str], None]
