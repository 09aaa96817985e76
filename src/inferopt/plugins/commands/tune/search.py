"""``inferopt tune``: search the installed techniques for the best recipe within an accuracy
budget.

The search space is every optimizer that declares searchable option values (``option(...,
searchable=(...))``), built-in and third-party alike, or the techniques the user names. Each
candidate recipe is one trial: an ordinary pipeline run on the baseline model loaded once, with
the latency measured interleaved (A B B A ...) against that baseline, so every trial is compared
with the same model on the same harness. The strategy, cheapest first:

1. the baseline against itself (an A/A trial: what "no change" looks like on this machine);
2. each technique alone at its defaults, cheap kinds first (quantization, pruning, others);
3. a greedy walk over each technique's searchable options, one option changed at a time, from
   the technique's best trial so far, cheapest technique first; then 2 and 3 for the techniques
   that train a model (distillation);
4. per-layer sensitivity when a technique improves the objective but breaks the budget: leave one
   layer out at a time (its ``skip`` option), rank the layers by how much accuracy comes back,
   and retry with the most sensitive ones kept in float;
5. pairs of the techniques' best candidates within the budget (structural techniques before
   quantization), skipping pairs whose predicted accuracy drop breaks the budget or whose
   predicted point is dominated by a trial already measured.

Every trial is appended to ``trials.jsonl`` in the output directory as it finishes; a rerun with
the same ``--out`` replays the search and skips the trials already logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from inferopt import _options as options
from inferopt._errors import InferoptError, Interrupted, UsageError
from inferopt._logging import get_logger
from inferopt._manager import PluginManager
from inferopt._recipe import Gates, Recipe, Spec
from inferopt._report import finite_json

SCHEMA = "inferopt.tune/1"
TRIAL_LOG = "trials.jsonl"
SUMMARY = "tune.json"
MARKDOWN = "tune.md"
PLOT = "pareto.png"
BEST = "best"
OBJECTIVES = ("latency", "size", "throughput")
# smallest throughput gain called an improvement (throughput has no confidence interval)
MIN_THROUGHPUT_GAIN = 0.02
# the order techniques are tried in and combined in: structural changes before quantization
KIND_RANK = {"quantization": 0, "pruning": 1, "": 2, "distillation": 3}
COMBINE_RANK = {"distillation": 0, "pruning": 1, "": 2, "quantization": 3}
TRAINING_KINDS = ("distillation",)
MAX_WALK_ROUNDS = 3
MAX_SENSITIVITY_LAYERS = 32
EPSILON = 1e-9


@attrs.frozen
class Budget:
    """The accuracy budget: at most ``value`` points of top-1 accuracy, or ``value`` percent of
    the baseline's accuracy when ``relative``."""

    value: float
    relative: bool = False

    def drop(self, trial: dict[str, Any]) -> float | None:
        value = trial.get("accuracy_drop_percent" if self.relative else "accuracy_drop_points")
        return float(value) if isinstance(value, int | float) else None

    def text(self) -> str:
        return f"{self.value:g}% of the baseline's accuracy" if self.relative \
            else f"{self.value:g} points"


@attrs.frozen
class Point:
    """A candidate recipe: optimizer steps in order, each a name and its non-default options."""

    steps: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    @property
    def key(self) -> str:
        return " + ".join(str(Spec(name, dict(opts))) for name, opts in self.steps) or "none"

    def specs(self) -> tuple[Spec, ...]:
        return tuple(Spec(name, dict(opts)) for name, opts in self.steps)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": name, "options": dict(opts)} for name, opts in self.steps]

    def then(self, other: Point) -> Point:
        return Point(self.steps + other.steps)


@attrs.define
class Technique:
    """One optimizer in the search space: its fixed options and the values to try for the rest
    (each option's default first)."""

    name: str
    kind: str
    plugin: str
    distribution: str
    defaults: dict[str, Any]
    fixed: dict[str, Any]
    dims: dict[str, list[Any]]
    has_skip: bool

    def point(self, values: dict[str, Any]) -> Point:
        merged = {**self.fixed, **values}
        opts = tuple(sorted((k, v) for k, v in merged.items() if self.defaults.get(k) != v
                            or k in self.fixed))
        return Point(((self.name, opts),))

    def default_point(self) -> Point:
        return self.point({})

    def values_of(self, point: Point) -> dict[str, Any]:
        return {**self.defaults, **self.fixed, **dict(point.steps[0][1])}

    def neighbours(self, point: Point) -> list[Point]:
        """The points one searchable option away from ``point``."""
        current = self.values_of(point)
        out = []
        for name, values in self.dims.items():
            for value in values:
                if value != current.get(name):
                    out.append(self.point({**{k: current[k] for k in self.dims}, name: value}))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"technique": self.name, "kind": self.kind, "plugin": self.plugin,
                "distribution": self.distribution, "fixed": self.fixed, "search": self.dims,
                "skip_option": self.has_skip}


@attrs.frozen
class TuneSettings:
    """What to tune and how: the recipe (model, data, backend, metrics), the goal and limits."""

    recipe: Recipe
    budget: Budget
    objective: str = "latency"
    budget_seconds: float = 600.0
    max_trials: int = 40
    techniques: tuple[Spec, ...] = ()
    out: Path = Path("inferopt-tune")
    restart: bool = False
    save: bool = True


class _Stop(Exception):
    """The search stops here (trial limit or time budget); the reason is the message."""


@attrs.define
class TuneResult:
    """A finished search: the ``inferopt.tune/1`` document and where it was written."""

    document: dict[str, Any]
    out: Path

    @property
    def chosen(self) -> dict[str, Any] | None:
        chosen_id = self.document.get("chosen")
        return next((t for t in self.document["trials"] if t["id"] == chosen_id), None)

    @property
    def closest(self) -> list[dict[str, Any]]:
        ids = self.document.get("closest") or []
        by_id = {t["id"]: t for t in self.document["trials"]}
        return [by_id[i] for i in ids]


def search_space(registry: Any, techniques: tuple[Spec, ...]) -> tuple[list[Technique],
                                                                        list[str]]:
    """The techniques to search and notes on what was left out. Without ``techniques``, every
    optimizer that declares searchable values; the options a technique spec gives are fixed."""
    notes: list[str] = []
    if techniques:
        chosen = [(registry.get("optimizer", s.name), s) for s in techniques]
        names = [s.name for s in techniques]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UsageError(f"--technique {', '.join(dup)} is given twice; give each technique "
                             "once (fix options with NAME:key=value)")
    else:
        chosen = [(e, Spec(e.name)) for e in registry.entries("optimizer")
                  if any(o.get("searchable") for o in options.describe(e.obj))]
        if not chosen:
            raise UsageError("no installed optimizer declares searchable options; name the "
                             "techniques to try with --technique NAME")
    space = []
    for entry, spec in chosen:
        where = f"--technique {spec.name!r}"
        instance = options.build(entry.obj, spec.options, where)  # checks the fixed options
        described = {o["name"]: o for o in options.describe(entry.obj)}
        fixed = {k.replace("-", "_"): options.json_safe(getattr(instance, k.replace("-", "_")))
                 for k in spec.options}
        defaults = {n: o["default"] for n, o in described.items()}
        dims: dict[str, list[Any]] = {}
        for name, o in described.items():
            if name in fixed or not o.get("searchable"):
                continue
            values = [o["default"]]
            for value in o["searchable"]:
                try:
                    options.build(entry.obj, {**spec.options, name: value}, where)
                except UsageError as exc:
                    notes.append(f"{entry.name}: searchable value {name}={value!r} left out "
                                 f"(plugin {entry.plugin!r} declares a value it rejects: {exc})")
                    continue
                if value not in values:
                    values.append(value)
            if len(values) > 1:
                dims[name] = values
        space.append(Technique(entry.name, str(getattr(entry.obj, "kind", "") or ""),
                               entry.plugin, entry.distribution, defaults, fixed, dims,
                               "skip" in described))
    space.sort(key=lambda t: (KIND_RANK.get(t.kind, KIND_RANK[""]), t.name))
    return space, notes


def tune(settings: TuneSettings, manager: PluginManager | None = None,
         echo: Callable[[str], None] | None = None) -> TuneResult:
    """Run the search and return its result; ``echo`` receives one line per trial."""
    return _Tuner(settings, manager, echo or (lambda _line: None)).run()


class _Tuner:
    def __init__(self, settings: TuneSettings, manager: PluginManager | None,
                 echo: Callable[[str], None]) -> None:
        self.s = settings
        self.echo = echo
        self.start = time.monotonic()
        self.log = get_logger(command="tune")
        from inferopt._registry import load_plugins

        self.manager, self.registry = load_plugins(manager)
        self.trials: dict[str, dict[str, Any]] = {}  # by key, in the order they were run
        self.sensitivity: dict[str, dict[str, Any]] = {}
        self.decisions: list[dict[str, Any]] = []
        self.logged: dict[str, dict[str, Any]] = {}
        self.new_trials = 0
        self.durations: dict[str, float] = {}  # trial key -> seconds, this invocation
        self.stopped: str | None = None

    # -- set-up -------------------------------------------------------------------------------

    def run(self) -> TuneResult:
        self._check_objective()
        self.space, notes = search_space(self.registry, self.s.techniques)
        for note in notes:
            self.log.warning(note)
        self.notes = notes
        self.recipe = self._trial_recipe()
        self._check_out_dir()
        self._load()
        self._open_log()
        try:
            self._search()
        except _Stop as stop:
            self.stopped = str(stop)
        return self._finish()

    def _generic(self) -> tuple[str, str] | None:
        """(metric, field) of an objective given as METRIC.FIELD; None for the named ones."""
        if self.s.objective in OBJECTIVES:
            return None
        metric, _dot, field = self.s.objective.partition(".")
        return metric, field

    def _check_objective(self) -> None:
        generic = self._generic()
        if generic is None:
            return
        directed = {f"{e.name}.{k}": q for e in self.registry.entries("metric")
                    for k, q in e.obj.quantities.items() if q.better and not k.endswith("*")}
        if self.s.objective not in directed:
            raise UsageError(f"--objective {self.s.objective!r}: use one of "
                             f"{', '.join(OBJECTIVES + tuple(sorted(directed)))}")
        self.objective_better = directed[self.s.objective].better

    def _trial_recipe(self) -> Recipe:
        from inferopt._pipeline import resolve_plugins

        recipe = self.s.recipe
        names = [m.name for m in recipe.metrics] if recipe.metrics_explicit else []
        metrics = [m for m in recipe.metrics if recipe.metrics_explicit]
        needed = ["latency", "accuracy", "size"]
        if self.s.objective == "throughput":
            needed.append("throughput")
        generic = self._generic()
        if generic is not None and generic[0] not in needed:
            needed.append(generic[0])
        metrics += [Spec(n) for n in needed if n not in names]
        recipe = attrs.evolve(recipe, optimize=(), metrics=tuple(metrics), metrics_explicit=True,
                              gates=Gates(), out=None)
        _backend, _steps, resolved = resolve_plugins(recipe, self.registry)
        latency = next(m for m in resolved if m.spec.name == "latency")
        if not latency.instance.paired:
            raise UsageError("inferopt tune times every trial interleaved with the baseline; "
                             "remove interleave=false from --metric latency")
        return recipe

    def _check_out_dir(self) -> None:
        out = self.s.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {str(out)!r} exists and is not a directory; choose another")
        cwd = Path.cwd().resolve()
        if cwd == out.resolve() or out.resolve() in cwd.parents:
            raise UsageError(f"--out {str(out)!r} is the current directory or contains it; give "
                             "a new subdirectory, for example --out tune-runs/mine")
        ours = {TRIAL_LOG, SUMMARY, MARKDOWN, PLOT, BEST}
        if out.is_dir():
            names = {p.name for p in out.iterdir()}
            if names and TRIAL_LOG not in names:
                raise UsageError(f"--out {str(out)!r} is not empty and holds no {TRIAL_LOG}, so "
                                 "it is not an earlier tune to continue; choose another directory")
            if self.s.restart and names:
                if names - ours:
                    raise UsageError(f"--restart: {str(out)!r} holds files inferopt tune did not "
                                     f"write ({', '.join(sorted(names - ours))}); remove them or "
                                     "choose another --out")
                for name in names:
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _load(self) -> None:
        """The baseline model and the data, loaded once for every trial."""
        import torch

        from inferopt._contract import SourceContext
        from inferopt._pipeline import _check_module, as_data, new_run_id, resolve
        from inferopt._sources import resolve_model_source

        recipe = self.recipe
        loading = time.monotonic()
        ctx = resolve(recipe, self.manager, self.registry, new_run_id())
        torch.manual_seed(recipe.seed)
        source_ctx = SourceContext(log=self.log, batch_size=recipe.batch_size, seed=recipe.seed,
                                   trust_model=recipe.trust_model)
        assert ctx.model_source is not None and ctx.data_spec is not None
        self.model = ctx.model_source.obj().load(recipe.model, source_ctx)
        _check_module(self.model, recipe.model)
        data_entry = resolve_model_source(self.registry, ctx.data_spec, kind="data source")
        data = as_data(data_entry.obj().load(ctx.data_spec, source_ctx), recipe.batch_size)
        if recipe.split is not None and data.eval:
            from inferopt._splits import split_data

            data = split_data(data, recipe.split, recipe.batch_size)
        if not data.eval:
            raise UsageError(f"--data {ctx.data_spec!r} gave no batches; it must yield at least "
                             "one")
        if not data.has_labels:
            raise UsageError(f"inferopt tune keeps accuracy within a budget, which needs labels; "
                             f"the data {ctx.data_spec!r} has none. Give labelled data")
        samples = data.num_samples
        if recipe.batch_size_explicit and recipe.batch_size > samples:
            raise UsageError(
                f"--batch-size {recipe.batch_size} is larger than the data: {ctx.data_spec!r} "
                f"has {samples} samples to measure on; give --batch-size {samples} or less")
        self.data = data
        self.data_spec = ctx.data_spec
        self.load_seconds = time.monotonic() - loading
        self.layers = _weighted_layers(self.model)
        from inferopt._artifacts import weights_bytes

        self.settings_doc = {
            "model": recipe.model, "data": self.data_spec,
            "split": recipe.split.to_dict() if recipe.split else None,
            "batch_size": recipe.batch_size, "seed": recipe.seed,
            "backend": str(recipe.backend),
            # what the user asked for; metrics the objective adds do not change the baseline
            "metrics": [str(m) for m in self.s.recipe.metrics]
            if self.s.recipe.metrics_explicit else [],
            "output": recipe.output,
        }
        digest = hashlib.sha256(weights_bytes(self.model))
        digest.update(json.dumps(self.settings_doc, sort_keys=True).encode())
        _hash_data(digest, data)  # the samples themselves, not just their description
        self.fingerprint = digest.hexdigest()[:16]

    def _open_log(self) -> None:
        path = self.s.out / TRIAL_LOG
        if path.is_file():
            lines = path.read_text().splitlines()
            records = []
            for i, line in enumerate(lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i == len(lines) - 1:
                        continue  # the line an interruption cut short: that trial runs again
                    raise UsageError(f"{path}: line {i + 1} is not JSON; the log is damaged. "
                                     "Use --restart to start over") from None
            header = records[0] if records and records[0].get("type") == "header" else None
            if header is None or header.get("schema") != SCHEMA:
                raise UsageError(f"{path} is not an inferopt tune log; use another --out")
            if header.get("fingerprint") != self.fingerprint:
                old = header.get("settings", {})
                changed = [k for k in self.settings_doc if old.get(k) != self.settings_doc[k]]
                what = ", ".join(changed) if changed else "the baseline model's weights"
                raise UsageError(
                    f"--out {str(self.s.out)!r} holds a tune of a different baseline (changed: "
                    f"{what}); its trials cannot be reused. Choose another --out, or --restart "
                    "to discard them")
            for rec in records[1:]:
                if rec.get("type") in ("trial", "sensitivity"):
                    self.logged[rec["key"]] = rec
            # rewrite without a cut-short last line, so that appends start on a fresh line
            _write_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
            self.log.info("continuing a tune", log=str(path), logged=len(self.logged))
            self.echo(f"continuing: {len(self.logged)} trial(s) already in {path}")
        else:
            self.s.out.mkdir(parents=True, exist_ok=True)
            header = {"type": "header", "schema": SCHEMA, "fingerprint": self.fingerprint,
                      "settings": self.settings_doc,
                      "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            path.write_text(json.dumps(header) + "\n")
        self.log_path = path

    def _append(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(finite_json(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- the search ---------------------------------------------------------------------------

    def _search(self) -> None:
        baseline = self._trial(Point(), "baseline")
        if baseline["status"] != "ok":  # bad input, not a bad candidate: say so, exit 2
            raise UsageError(f"the baseline itself could not be measured: {baseline['error']}")
        # techniques that train a model cost the most: searched after all the others
        first = [t for t in self.space if t.kind not in TRAINING_KINDS]
        last = [t for t in self.space if t.kind in TRAINING_KINDS]
        for group in (first, last):
            for tech in group:
                self._trial(tech.default_point(), "single")
            by_cost = sorted(group, key=lambda t: self._step_seconds(t.default_point()))
            for tech in by_cost:
                self._walk(tech)
        for tech in sorted(self.space, key=lambda t: self._step_seconds(t.default_point())):
            self._fallback(tech)
        self._combine()

    def _walk(self, tech: Technique) -> None:
        """Greedy: try every one-option change of the technique's best point; move to the new
        best; stop when it stays put."""
        current = tech.default_point()
        for _round in range(MAX_WALK_ROUNDS):
            for point in tech.neighbours(current):
                self._trial(point, "search")
            best = self._best_single(tech)
            if best is None or best.key == current.key:
                return
            current = best

    def _best_single(self, tech: Technique) -> Point | None:
        done = [t for t in self.trials.values()
                if t["status"] == "ok" and len(t["steps"]) == 1
                and t["steps"][0]["name"] == tech.name and t["phase"] != "sensitivity-retry"]
        if not done:
            return None
        best = max(done, key=self._rank)
        return Point(((tech.name, tuple(sorted(best["steps"][0]["options"].items()))),))

    def _rank(self, t: dict[str, Any]) -> tuple[bool, bool, float, float]:
        """Meets the goal, then within budget, then closest to the budget, then objective."""
        value = self._objective(t)
        return (self._meets(t), self._within(t), -self._excess(t),
                value if value is not None else -math.inf)

    def _fallback(self, tech: Technique) -> None:
        """Per-layer sensitivity: the technique improves the objective but breaks the budget;
        keep the layers whose quantization/pruning costs the most accuracy in float."""
        if not tech.has_skip or len(self.layers) < 2:
            return
        mine = [t for t in self.trials.values() if t["status"] == "ok"
                and [s["name"] for s in t["steps"]] == [tech.name]]
        if any(self._meets(t) for t in mine):
            return
        worth = [t for t in mine if self._improves(t) and not self._within(t)]
        if not worth:
            return
        start = min(worth, key=self._excess)
        base_opts = dict(start["steps"][0]["options"])
        skip_before = list(base_opts.get("skip") or [])
        start_drop = self.s.budget.drop(start)
        assert start_drop is not None
        layers = [n for n in self.layers if n not in skip_before][:MAX_SENSITIVITY_LAYERS]
        sensitivity: dict[str, float] = {}
        for layer in layers:
            point = _with_skip(tech.name, base_opts, [*skip_before, layer])
            rec = self._sensitivity(point, start["key"], layer)
            drop = self.s.budget.drop(rec)
            if rec["status"] == "ok" and drop is not None:
                sensitivity[layer] = start_drop - drop
        if not sensitivity:
            self.decisions.append({"candidate": start["key"], "decision": "no fallback",
                                   "reason": "no layer could be left out on its own"})
            return
        ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
        # keep 1, 2, 4, ... of the most sensitive layers in float; never all of them (that
        # would be the baseline again)
        most = min(len(ranked), len(layers) - 1)
        counts = [k for k in (2 ** i for i in range(most.bit_length())) if k <= most]
        if most and counts[-1] != most:
            counts.append(most)
        for k in counts:
            t = self._trial(_with_skip(tech.name, base_opts, skip_before + ranked[:k]),
                            "sensitivity-retry")
            if t["status"] == "ok" and self._within(t):
                return

    def _combine(self) -> None:
        """Pairs of the techniques' best candidates, structural techniques first."""
        best: dict[str, dict[str, Any]] = {}
        for t in self.trials.values():
            if t["status"] != "ok" or len(t["steps"]) != 1 or not self._meets(t):
                continue
            name = t["steps"][0]["name"]
            if name not in best or self._rank(t) > self._rank(best[name]):
                best[name] = t
        kinds = {tech.name: tech.kind for tech in self.space}
        plans = []
        for a_name, a in best.items():
            for b_name, b in best.items():
                ra = COMBINE_RANK.get(kinds[a_name], COMBINE_RANK[""])
                rb = COMBINE_RANK.get(kinds[b_name], COMBINE_RANK[""])
                if a_name == b_name or ra >= rb:
                    continue
                point = _point_of(a).then(_point_of(b))
                drop_a, drop_b = self.s.budget.drop(a), self.s.budget.drop(b)
                assert drop_a is not None and drop_b is not None
                drop = max(drop_a, 0.0) + max(drop_b, 0.0)
                value = (self._objective(a) or 0.0) * (self._objective(b) or 0.0)
                if drop > self.s.budget.value + EPSILON:
                    self.decisions.append({
                        "candidate": point.key, "decision": "skipped",
                        "reason": f"predicted accuracy drop {drop:.3g} (sum of the two steps') "
                                  f"exceeds the budget {self.s.budget.value:g}"})
                    continue
                dominator = next((t for t in self.trials.values() if t["status"] == "ok"
                                  and (self._objective(t) or -math.inf) >= value
                                  and (self.s.budget.drop(t) or 0.0) <= drop), None)
                if dominator is not None:
                    self.decisions.append({
                        "candidate": point.key, "decision": "skipped",
                        "reason": f"predicted point (objective {value:.3g}, drop {drop:.3g}) is "
                                  f"dominated by trial {dominator['id']} ({dominator['key']})"})
                    continue
                plans.append((value, point))
        for _value, point in sorted(plans, key=lambda p: -p[0]):
            self._trial(point, "combine")

    # -- trials ---------------------------------------------------------------------------

    def _step_seconds(self, point: Point) -> float:
        t = self.trials.get(point.key)
        if t is None or t["status"] != "ok":
            return math.inf
        return float(t.get("step_seconds") or 0.0)

    def _check_limits(self, point: Point, extra: bool = False) -> None:
        """Stop before a trial that would pass the trial limit or, by the time trials of the same
        techniques took so far (else the median trial), the time budget."""
        if not extra and self.trial_count() >= self.s.max_trials:
            raise _Stop(f"trial limit reached ({self.s.max_trials} trials)")
        elapsed = time.monotonic() - self.start
        durations = sorted(self.durations.values())
        median = durations[len(durations) // 2] if durations else 0.0
        names = {name for name, _opts in point.steps}
        same = [d for key, d in self.durations.items()
                if {n for n, _o in _steps_of_key(key)} & names]
        estimate = max(same, default=median)
        # the chosen recipe is run again to be saved: keep back the longest goal-meeting trial
        goal = [d for key, d in self.durations.items() if self._meets(self.trials[key])]
        # ... plus loading the model and data again, which that run does first
        reserve = max(goal, default=median) + self.load_seconds if self.s.save else 0.0
        if elapsed + estimate + reserve > self.s.budget_seconds:
            raise _Stop(f"time budget reached ({self.s.budget_seconds / 60:g} min; "
                        f"{elapsed:.0f} s spent, the next trial would take about "
                        f"{estimate:.0f} s)")

    def trial_count(self) -> int:
        return sum(1 for t in self.trials.values() if t["phase"] != "baseline")

    def _trial(self, point: Point, phase: str) -> dict[str, Any]:
        if point.key in self.trials:
            return self.trials[point.key]
        logged = self.logged.get(point.key)
        if logged is None:
            if phase != "baseline":
                self._check_limits(point)
            logged = self._run_trial(point, phase)
        else:
            logged = dict(logged, replayed=True)
            if phase != "baseline" and self.trial_count() >= self.s.max_trials:
                raise _Stop(f"trial limit reached ({self.s.max_trials} trials)")
        logged["id"] = len(self.trials)
        self.trials[point.key] = logged
        return logged

    def _sensitivity(self, point: Point, of: str, layer: str) -> dict[str, Any]:
        key = f"{point.key} (accuracy only)"
        if key in self.sensitivity:
            return self.sensitivity[key]
        rec = self.logged.get(key)
        if rec is None:
            self._check_limits(point, extra=True)
            metrics = (Spec("accuracy"),)
            rec = {"type": "sensitivity", "key": key, "of": of, "layer": layer,
                   **self._execute(point, attrs.evolve(self.recipe, metrics=metrics))}
            rec.pop("report", None)
            self._append(rec)
            drop = self.s.budget.drop(rec)
            self.echo(f"  sensitivity {layer}: " + (
                f"accuracy drop {drop:.3g} with it left out" if drop is not None
                else f"failed: {rec.get('error')}"))
        self.sensitivity[key] = rec
        return rec

    def _run_trial(self, point: Point, phase: str) -> dict[str, Any]:
        rec = {"type": "trial", "key": point.key, "phase": phase, "steps": point.to_json(),
               **self._execute(point, self.recipe)}
        if phase != "baseline" and "report" in rec:
            rec["report"].pop("environment", None)
        self._append(rec)
        if rec["status"] == "ok":
            self.durations[point.key] = rec["seconds"]
        self.echo(f"trial {self.trial_count() + (0 if phase == 'baseline' else 1)} "
                  f"[{phase}] {point.key}: {_describe(rec, self.s.budget)}")
        return rec

    def _execute(self, point: Point, recipe: Recipe) -> dict[str, Any]:
        from inferopt._pipeline import run as run_pipeline

        started = time.monotonic()
        rec: dict[str, Any] = {"started": dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds")}
        try:
            # a trial that wrecks the model is scored by the accuracy budget, not refused
            report = run_pipeline(attrs.evolve(recipe, optimize=point.specs(), split=None,
                                               allow_collapse=True),
                                  model=self.model, data=self.data, manager=self.manager,
                                  save=False)
        except KeyboardInterrupt:
            raise
        except Interrupted:  # the pipeline turns Ctrl-C into this: stop the search, not a trial
            raise KeyboardInterrupt from None
        except InferoptError as exc:
            rec.update(status="failed", error=str(exc))
        except Exception as exc:  # a broken plugin costs its own trial, not the search
            rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        else:
            v = report.verdict
            thr_b = report.baseline.get("throughput", {}).get("samples_per_s")
            thr_o = report.optimized.get("throughput", {}).get("samples_per_s")
            rec.update(
                status="ok",
                speedup=v.get("speedup"), speedup_ci=v.get("speedup_ci"),
                latency_verdict=v.get("latency"),
                accuracy_drop_points=v.get("accuracy_drop_points"),
                accuracy_drop_percent=v.get("accuracy_drop_percent"),
                size_ratio=v.get("size_ratio"),
                throughput_ratio=(thr_o / thr_b if thr_b and thr_o else None),
                objective_ratio=self._improvement(report),
                accuracy=report.optimized.get("accuracy", {}).get("top1"),
                step_seconds=sum(s.seconds for s in report.steps),
                summaries=[s.details.get("summary", "") for s in report.steps],
                warnings=report.warnings,
                report=report.to_dict())
        rec["seconds"] = round(time.monotonic() - started, 3)
        return rec

    # -- judging ------------------------------------------------------------------------------

    def _within(self, t: dict[str, Any]) -> bool:
        drop = self.s.budget.drop(t)
        return t["status"] == "ok" and drop is not None and drop <= self.s.budget.value + EPSILON

    def _excess(self, t: dict[str, Any]) -> float:
        drop = self.s.budget.drop(t)
        return math.inf if drop is None else max(0.0, drop - self.s.budget.value)

    def _improvement(self, report: Any) -> float | None:
        """METRIC.FIELD objectives: how many times better the optimized value is (baseline /
        optimized when lower is better, optimized / baseline when higher is)."""
        generic = self._generic()
        if generic is None:
            return None
        metric, field = generic
        b = report.baseline.get(metric, {}).get(field)
        o = report.optimized.get(metric, {}).get(field)
        if not all(isinstance(x, int | float) and x > 0 for x in (b, o)):
            return None
        return b / o if getattr(self, "objective_better", "lower") == "lower" else o / b

    def _objective(self, t: dict[str, Any]) -> float | None:
        if self._generic() is not None:
            value = t.get("objective_ratio")
        elif self.s.objective == "latency":
            value = t.get("speedup")
        elif self.s.objective == "size":
            ratio = t.get("size_ratio")
            value = 1.0 / ratio if ratio else None
        else:
            value = t.get("throughput_ratio")
        return float(value) if isinstance(value, int | float) else None

    def _improves(self, t: dict[str, Any]) -> bool:
        if t["status"] != "ok" or not t["steps"]:
            return False
        if self.s.objective == "latency":
            return bool(t.get("latency_verdict") == "faster")
        if self.s.objective == "size":
            return isinstance(t.get("size_ratio"), int | float) and t["size_ratio"] < 1.0
        ratio = t.get("objective_ratio" if self._generic() else "throughput_ratio")
        return isinstance(ratio, int | float) and ratio > 1.0 + MIN_THROUGHPUT_GAIN

    def _meets(self, t: dict[str, Any]) -> bool:
        return self._within(t) and self._improves(t)

    def goal_text(self) -> str:
        better = {"latency": "measurably faster than the baseline (interleaved A/B, CI above "
                             "x1)", "size": "smaller than the baseline",
                  "throughput": f"at least {MIN_THROUGHPUT_GAIN:.0%} more throughput"}
        better.setdefault(self.s.objective, f"at least {MIN_THROUGHPUT_GAIN:.0%} better "
                                            f"{self.s.objective} (no confidence interval)")
        return f"accuracy drop <= {self.s.budget.text()} and {better[self.s.objective]}"

    # -- results ------------------------------------------------------------------------------

    def _finish(self) -> TuneResult:
        trials = list(self.trials.values())
        rows = [self._row(t) for t in trials]
        pareto = _pareto([t for t in trials if t["status"] == "ok"], self.s.budget,
                         self.s.objective == "throughput")
        goal = [t for t in trials if self._meets(t)]
        chosen = max(goal, key=lambda t: (self._objective(t) or 0.0,
                                          -(self.s.budget.drop(t) or 0.0),
                                          -(t.get("size_ratio") or 1.0)), default=None)
        candidates = [t for t in trials if t["status"] == "ok" and t["steps"]]
        closest = [] if chosen is not None else sorted(
            candidates, key=lambda t: (self._excess(t), not self._improves(t),
                                       -(self._objective(t) or 0.0)))[:3]
        baseline = self.trials.get("none")
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "settings": {**self.settings_doc, "objective": self.s.objective,
                         "max_accuracy_drop": self.s.budget.value,
                         "relative": self.s.budget.relative,
                         "budget_minutes": round(self.s.budget_seconds / 60, 3),
                         "max_trials": self.s.max_trials,
                         "techniques": [str(t) for t in self.s.techniques] or None},
            "goal": self.goal_text(),
            "fingerprint": self.fingerprint,
            "seconds": round(time.monotonic() - self.start, 2),
            "stopped": self.stopped,
            "space": [t.to_json() for t in self.space],
            "notes": self.notes,
            "baseline": _baseline_of(baseline),
            "trials": rows,
            "sensitivity": [{k: v for k, v in r.items() if k != "type"}
                            for r in self.sensitivity.values()],
            "decisions": self.decisions,
            "pareto": [t["id"] for t in pareto],
            "chosen": chosen["id"] if chosen is not None else None,
            "closest": [t["id"] for t in closest],
            "artifacts": {"dir": str(self.s.out), "log": str(self.log_path),
                          "summary": str(self.s.out / SUMMARY),
                          "markdown": str(self.s.out / MARKDOWN)},
        }
        result = TuneResult(doc, self.s.out)
        self._write(result)
        if chosen is not None and self.s.save:
            self._save_best(chosen, result)
        elif (self.s.out / BEST).is_dir():
            # an earlier invocation's choice that this one does not confirm: not left to be
            # mistaken for this search's result
            shutil.rmtree(self.s.out / BEST)
            self.echo(f"removed {self.s.out / BEST}: no candidate meets this goal")
        doc["seconds"] = round(time.monotonic() - self.start, 2)
        self._write(result)
        return result

    def _row(self, t: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in t.items() if k not in ("report", "type")}
        row.update(within_budget=self._within(t), meets_goal=self._meets(t),
                   objective=self._objective(t), replayed=bool(t.get("replayed")))
        return row

    def _write(self, result: TuneResult) -> None:
        out = self.s.out
        _write_atomically(out / SUMMARY,
                          json.dumps(finite_json(result.document), indent=2) + "\n")
        _write_atomically(out / MARKDOWN, to_markdown(result.document))
        from inferopt import _plotting as plotting

        if plotting.available():
            try:
                plotting.plot_tune(result.document, out / PLOT)
                result.document["artifacts"]["plot"] = str(out / PLOT)
            except Exception as exc:  # a plotting problem must not lose the search
                self.log.warning("pareto plot failed", error=repr(exc))

    def _save_best(self, chosen: dict[str, Any], result: TuneResult) -> None:
        """Run the chosen recipe again as an ordinary ``inferopt run`` into ``OUT/best``, so that
        it is saved, and loads with ``inferopt.load``, exactly like a run result."""
        from inferopt._pipeline import run as run_pipeline

        gate = ("max_relative_accuracy_drop" if self.s.budget.relative else "max_accuracy_drop")
        recipe = attrs.evolve(self.s.recipe, optimize=_point_of(chosen).specs(),
                              metrics=self.recipe.metrics, metrics_explicit=True,
                              out=str(self.s.out / BEST),
                              gates=Gates(**{gate: self.s.budget.value}))
        self.echo(f"saving trial {chosen['id']} ({chosen['key']}) to {self.s.out / BEST}")
        report = run_pipeline(recipe, manager=self.manager, overwrite=True)
        result.document["artifacts"]["best"] = str(self.s.out / BEST)
        result.document["best_run"] = {"run_id": report.run_id, "verdict": report.verdict,
                                       "gates": report.gates}


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so an interruption never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _hash_data(digest: Any, data: Any) -> None:
    """Feed every tensor of the data's splits (inputs and labels) into ``digest``."""
    import torch

    from inferopt._model_io import iter_tensors

    for split in (data.eval, data.calibration, data.train):
        for batch in split:
            for tensor in iter_tensors((batch.inputs, batch.labels)):
                digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
                raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                digest.update(raw.numpy().tobytes())


def _steps_of_key(key: str) -> list[tuple[str, str]]:
    """(optimizer name, options text) of each step of a trial key."""
    steps = []
    for part in key.split(" + "):
        name, _sep, opts = part.partition(":")
        steps.append((name, opts))
    return steps


def _point_of(t: dict[str, Any]) -> Point:
    return Point(tuple((s["name"], tuple(sorted(s["options"].items()))) for s in t["steps"]))


def _with_skip(name: str, opts: dict[str, Any], skip: list[str]) -> Point:
    merged = dict(opts)
    merged["skip"] = list(skip)
    return Point(((name, tuple(sorted(merged.items()))),))


def _weighted_layers(model: Any) -> list[str]:
    """Leaf modules with a weight matrix or kernel: what quantizers and pruners act on."""
    import torch

    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and not list(module.children()) and isinstance(weight, torch.nn.Parameter) \
                and weight.dim() >= 2:
            out.append(name)
    return out


def _baseline_of(t: dict[str, Any] | None) -> dict[str, Any]:
    if t is None or t["status"] != "ok":
        return {}
    base = t["report"]["baseline"]["metrics"]
    return {"accuracy": base.get("accuracy", {}).get("top1"),
            "size_bytes": base.get("size", {}).get("bytes"),
            "latency_p50_ms": base.get("latency", {}).get("p50_ms"),
            "a_a_speedup": t.get("speedup"), "a_a_speedup_ci": t.get("speedup_ci"),
            "environment": t["report"].get("environment", {})}


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True))


def _pareto(trials: list[dict[str, Any]], budget: Budget,
            with_throughput: bool) -> list[dict[str, Any]]:
    """Trials no other trial beats on every axis: speedup, size, accuracy (and throughput)."""
    points = []
    for t in trials:
        drop = budget.drop(t)
        if drop is None or t.get("speedup") is None or t.get("size_ratio") is None:
            continue
        vec = [t["speedup"], -t["size_ratio"], -drop]
        if with_throughput:
            if t.get("throughput_ratio") is None:
                continue
            vec.append(t["throughput_ratio"])
        points.append((t, vec))
    return [t for t, v in points if not any(_dominates(w, v) for _u, w in points)]


def _describe(rec: dict[str, Any], budget: Budget) -> str:
    if rec["status"] != "ok":
        return f"failed: {rec.get('error')}"
    parts = []
    if rec.get("speedup") is not None:
        ci = rec.get("speedup_ci") or [None, None]
        parts.append(f"x{rec['speedup']:.2f} [{_num(ci[0])}-{_num(ci[1])}] "
                     f"{rec.get('latency_verdict')}")
    drop = budget.drop(rec)
    if drop is not None:
        parts.append(f"accuracy drop {drop:.3g}{'%' if budget.relative else ' pts'}")
    if rec.get("size_ratio") is not None:
        parts.append(f"size {rec['size_ratio'] * 100:.1f}%")
    if rec.get("throughput_ratio") is not None:
        parts.append(f"throughput x{rec['throughput_ratio']:.2f}")
    parts.append(f"{rec['seconds']:.1f} s")
    return ", ".join(parts)


def _num(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, int | float) else "-"


COLUMNS = ("#", "phase", "recipe", "speedup [CI]", "latency", "acc. drop", "size", "budget",
           "note")


def table_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """One tuple of cells per trial, in the order the trials ran."""
    relative = doc["settings"]["relative"]
    pareto = set(doc["pareto"])
    rows: list[tuple[str, ...]] = []
    for t in doc["trials"]:
        if t["status"] != "ok":
            rows.append((str(t["id"]), t["phase"], t["key"], "-", "failed", "-", "-", "-",
                         str(t.get("error", ""))[:80]))
            continue
        drop = t.get("accuracy_drop_percent" if relative else "accuracy_drop_points")
        ci = t.get("speedup_ci") or [None, None]
        notes = []
        if t["id"] == doc.get("chosen"):
            notes.append("CHOSEN")
        if t["id"] in pareto:
            notes.append("pareto")
        if t["id"] in (doc.get("closest") or []):
            notes.append("closest")
        if t.get("replayed"):
            notes.append("from log")
        rows.append((
            str(t["id"]), t["phase"], t["key"],
            f"x{_num(t.get('speedup'))} [{_num(ci[0])}-{_num(ci[1])}]",
            str(t.get("latency_verdict") or "-"),
            "-" if drop is None else f"{drop:.2f}{'%' if relative else ''}",
            "-" if t.get("size_ratio") is None else f"{t['size_ratio'] * 100:.1f}%",
            "within" if t["within_budget"] else "OUT",
            ", ".join(notes)))
    return rows


def to_markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"# inferopt tune: {s['model']}", "",
             f"Goal: {doc['goal']}; objective `{s['objective']}`. "
             f"{len(doc['trials'])} trials in {doc['seconds']:.0f} s"
             + (f"; stopped: {doc['stopped']}" if doc.get("stopped") else "") + ".", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"
              for r in table_rows(doc)]
    lines += ["", "## Result", ""]
    lines += [f"- {line}" for line in result_lines(doc)]
    if doc["decisions"]:
        lines += ["", "## Skipped candidates", ""]
        lines += [f"- `{d['candidate']}`: {d['reason']}" for d in doc["decisions"]]
    return "\n".join(lines) + "\n"


def result_lines(doc: dict[str, Any]) -> list[str]:
    """What the search found, in words."""
    by_id = {t["id"]: t for t in doc["trials"]}
    lines = []
    if doc.get("chosen") is not None:
        t = by_id[doc["chosen"]]
        lines.append(f"chosen: trial {t['id']} {t['key']} ({_describe(t, _budget_of(doc))})")
        if doc.get("artifacts", {}).get("best"):
            lines.append(f"saved: {doc['artifacts']['best']} (load with inferopt.load)")
    else:
        lines.append(f"no candidate met the goal ({doc['goal']})")
        for i, tid in enumerate(doc.get("closest") or [], start=1):
            t = by_id[tid]
            lines.append(f"closest {i}: trial {t['id']} {t['key']} "
                         f"({_describe(t, _budget_of(doc))})")
    front = ", ".join(f"{i} ({by_id[i]['key']})" for i in doc["pareto"])
    lines.append(f"pareto front (speed, size, accuracy): {front or 'none'}")
    if doc.get("stopped"):
        lines.append(f"stopped early: {doc['stopped']}")
    return lines


def _budget_of(doc: dict[str, Any]) -> Budget:
    return Budget(doc["settings"]["max_accuracy_drop"], doc["settings"]["relative"])


def iter_log(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a trial log (header, trials, sensitivity measurements)."""
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def run_search(recipe: str | None, flags: dict[str, Any], *, budget: Budget, objective: str,
               budget_seconds: float, max_trials: int, techniques: tuple[Spec, ...], out: Path,
               restart: bool, strict_plugins: bool, echo: Callable[[str], None]) -> TuneResult:
    """``inferopt tune``: the recipe file and flags as for ``inferopt run``, then the search."""
    from inferopt._recipe import make_recipe

    settings = TuneSettings(
        recipe=make_recipe(recipe, **flags), budget=budget, objective=objective,
        budget_seconds=budget_seconds, max_trials=max_trials, techniques=techniques, out=out,
        restart=restart)
    manager = PluginManager(strict=True if strict_plugins else None).load_entrypoints()
    return tune(settings, manager=manager, echo=echo)
