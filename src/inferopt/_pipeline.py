"""The pipeline: resolve the recipe against the installed plugins, load model and data, measure
the baseline, apply the steps in order (each timed, logged and checked), measure again, compare,
report, save.

Everything that can be checked without torch (names, options, the output directory) is checked
first, so a typo fails in well under a second.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
import platform
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from inferopt._contract import (
    Backend,
    BatchFailed,
    Data,
    Metric,
    MetricContext,
    Optimizer,
    RunInfo,
    SourceContext,
    StepContext,
)
from inferopt._errors import (
    BudgetExceeded,
    InferoptError,
    Interrupted,
    PluginError,
    StepFailed,
    UsageError,
)
from inferopt._logging import get_logger
from inferopt._manager import PluginManager
from inferopt._prepare import BaselineElsewhere, Preparer, backend_refuses
from inferopt._recipe import Recipe, Spec
from inferopt._registry import Entry, Registry, load_plugins
from inferopt._report import Report, StepRecord
from inferopt._sources import model_loader, resolve_model_source

from . import __version__
from . import _options as options


@attrs.define
class Resolved:
    """A plugin entry with its built instance and the raw spec it came from."""

    spec: Spec
    entry: Entry
    instance: Any
    index: int = 0

    def provenance(self) -> dict[str, str]:
        return {"distribution": self.entry.distribution, "version": self.entry.version}


@attrs.define
class RunContext:
    """A run in progress; lifecycle hooks receive it."""

    run_id: str
    recipe: Recipe
    manager: PluginManager
    registry: Registry
    log: Any
    backend: Resolved
    steps: list[Resolved]
    metrics: list[Resolved]
    model_source: Entry | None = None
    data_spec: str | None = None
    data: Data | None = None
    phase: str = "starting"  # what the run is doing, for the message when it is interrupted
    out_dir_existed: bool = False
    out_dir: Path | None = None
    warnings: list[str] = attrs.field(factory=list)
    preparer: Preparer | None = None  # set once the data is loaded


def run_info(ctx: RunContext) -> RunInfo:
    """The frozen view of ``ctx`` that lifecycle hooks receive."""

    def warn(message: str) -> None:
        ctx.warnings.append(message)
        ctx.log.warning(message)

    return RunInfo(
        run_id=ctx.run_id, recipe=ctx.recipe.to_dict(), model=ctx.recipe.model,
        data=ctx.data_spec, backend=ctx.recipe.backend.name,
        steps=tuple(s.spec.name for s in ctx.steps),
        metrics=tuple(m.spec.name for m in ctx.metrics), out_dir=ctx.out_dir, log=ctx.log,
        warn=warn)


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _build(entry: Entry, spec: Spec, where: str) -> Any:
    return options.build(entry.obj, spec.options, where)


def resolve_plugins(
    recipe: Recipe, registry: Registry
) -> tuple[Resolved, list[Resolved], list[Resolved]]:
    """Check the recipe's backend, steps and metrics (names and options) against the registry."""
    backend_entry = registry.get("backend", recipe.backend.name)
    backend = Resolved(
        recipe.backend,
        backend_entry,
        _build(backend_entry, recipe.backend, f"backend {recipe.backend.name!r}"),
    )
    if recipe.baseline_backend is not None and recipe.baseline_backend != recipe.backend:
        backend = attrs.evolve(backend, instance=_baseline_elsewhere(recipe, registry,
                                                                     backend.instance))
    steps = []
    for i, spec in enumerate(recipe.optimize, start=1):
        entry = registry.get("optimizer", spec.name)
        steps.append(Resolved(spec, entry, _build(entry, spec, f"step {i} {spec.name!r}"), i))
    metrics = []
    seen = set()
    for spec in recipe.metrics:
        if spec.name in seen:
            raise UsageError(f"metric {spec.name!r} is listed twice; list each metric once")
        if not recipe.metrics_explicit and ("metric", spec.name) not in registry:
            continue  # a default metric whose plugin is blocked or not installed
        seen.add(spec.name)
        entry = registry.get("metric", spec.name)
        metrics.append(Resolved(spec, entry, _build(entry, spec, f"metric {spec.name!r}")))
    if recipe.gates.to_dict():
        from inferopt._quantities import check_gates, offered_gates

        installed = {e.name: e.obj for e in registry.entries("metric")}
        check_gates(recipe.gates.to_dict(), offered_gates(installed), seen, installed)
    return backend, steps, metrics


def _baseline_elsewhere(recipe: Recipe, registry: Registry, main: Backend) -> Backend:
    """The run's backend, with the baseline on ``recipe.baseline_backend``."""
    spec = recipe.baseline_backend
    assert spec is not None
    where = f"--baseline-backend {spec}"
    try:
        entry = registry.get("backend", spec.name)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    baseline = _build(entry, spec, f"baseline backend {spec.name!r}")
    if baseline.device != main.device:
        raise UsageError(f"{where}: it runs on {baseline.device!r} and backend "
                         f"{main.name!r} on {main.device!r}; the A/B runs need one device: "
                         "choose a baseline backend on the same device")
    if main.world_size > 1 or baseline.world_size > 1:
        raise UsageError(f"{where}: a baseline on another backend runs in one process; it "
                         "cannot be combined with a backend launched by torchrun")
    return BaselineElsewhere(main, baseline, f"plugin {entry.plugin!r} from {_provider(entry)}")


def _provider(entry: Entry) -> str:
    """``distribution version`` of a plugin, for messages that name who to blame."""
    return f"{entry.distribution} {entry.version}".strip()


def _check_model_file(spec: str) -> None:
    """A model spec naming a file that is not there is the first thing to say."""
    import re

    # python:pkg.pt:build names a module, not a file; only PATH.py is a file after python:
    pattern = (r"^python:(.+?\.py)(?::|$)" if spec.startswith("python:")
               else r"^(.+?\.(?:py|pt2|pt|pth|ts|safetensors))(?::|$)")
    match = re.match(pattern, spec)
    if match and not Path(match[1]).expanduser().exists():
        raise UsageError(f"--model {spec!r}: file {match[1]!r} does not exist")


def resolve(recipe: Recipe, manager: PluginManager, registry: Registry, run_id: str) -> RunContext:
    """Check every name and option of the recipe against the installed plugins."""
    backend, steps, metrics = resolve_plugins(recipe, registry)
    log = get_logger(run_id=run_id)
    ctx = RunContext(run_id, recipe, manager, registry, log, backend, steps, metrics)
    ctx.model_source = resolve_model_source(registry, recipe.model)
    ctx.data_spec = recipe.data or ctx.model_source.obj().default_data(recipe.model)
    if ctx.data_spec is None:
        _check_model_file(recipe.model)
        raise UsageError(
            f"--model {recipe.model!r} needs data: give --data SPEC (for example "
            "synthetic:shape=64x1024 or python:my_module:make_batches)"
        )
    resolve_model_source(registry, ctx.data_spec, kind="data source")
    for failure in manager.failures:
        ctx.warnings.append(
            f"plugin {failure.name!r} ({failure.distribution}) was not loaded: {failure.error}"
        )
    return ctx


def _recover_out_dir(recipe: Recipe) -> list[str]:
    """What killed runs left beside ``--out``: an earlier run put back, leftovers removed."""
    if recipe.out is None:
        return []
    from inferopt._artifacts import MANIFEST
    from inferopt._run_dir import recover

    return recover(Path(recipe.out), MANIFEST)


def choose_out_dir(recipe: Recipe, run_id: str, overwrite: bool) -> Path:
    if recipe.out is None:
        return Path("inferopt-runs") / run_id
    from inferopt._artifacts import MANIFEST

    out = Path(recipe.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory; choose another path")
    for above in out.absolute().parents:  # found now, not after the whole run
        if above.exists():
            if not above.is_dir():
                raise UsageError(f"--out {str(out)!r}: {str(above)!r} is a file, so the run "
                                 "cannot be saved under it; choose another path")
            if not os.access(above, os.W_OK | os.X_OK):
                raise UsageError(f"--out {str(out)!r}: {str(above)!r} is not writable; "
                                 "choose another path")
            break
    cwd = Path.cwd().resolve()
    if cwd == out.resolve() or out.resolve() in cwd.parents:
        raise UsageError(
            f"--out {str(out)!r} is the current directory or contains it; give a new "
            "subdirectory, for example --out runs/mine")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(
                f"--out {str(out)!r} already exists and is not empty; choose another directory "
                "or pass --overwrite to replace an earlier run there"
            )
        if not (out / MANIFEST).is_file():
            raise UsageError(
                f"--out {str(out)!r} holds files that are not an inferopt run; --overwrite only "
                "replaces directories an earlier run wrote. Choose another directory"
            )
    return out


def environment(backend: Backend) -> dict[str, Any]:
    import torch

    env = {
        "inferopt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": backend.device,
    }
    env.update(backend.describe())
    return env


def run(
    recipe: Recipe,
    *,
    model: Any = None,
    data: Data | Iterable[Any] | None = None,
    manager: PluginManager | None = None,
    registry: Registry | None = None,
    overwrite: bool = False,
    save: bool = True,
) -> Report:
    """Run a recipe end to end and return the report.

    ``model`` (an ``nn.Module``) and ``data`` (a :class:`Data` or an iterable of batches) replace
    the recipe's specs when given; the module passed in is copied, never modified.
    ``registry`` is the one ``manager`` built already (a Session's), else it is built here.
    """
    if manager is None or registry is None:
        manager, registry = load_plugins(manager)
    run_id = new_run_id()
    ctx = resolve(recipe, manager, registry, run_id) if model is None else _resolve_in_memory(
        recipe, manager, registry, run_id, data
    )
    recovered = _recover_out_dir(recipe) if save else []
    out_dir = choose_out_dir(recipe, run_id, overwrite) if save else None
    ctx.out_dir = out_dir
    for note in recovered:
        ctx.warnings.append(note)
        ctx.log.warning(note)
    ctx.out_dir_existed = out_dir is not None and out_dir.exists()
    import torch

    threads = torch.get_num_threads()  # a backend's threads option ends with the run
    try:
        return _run_resolved(ctx, model, data, registry, manager, overwrite)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(ctx)) from None
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and not _out_of_memory(exc):
            raise
        raise UsageError(
            f"out of memory during {ctx.phase} ({type(exc).__name__}: {str(exc)[:160]}); "
            "use a smaller --batch-size or less data, or a machine with more memory; "
            f"{_interrupted(ctx).split(': ', 1)[1]}") from exc
    except SystemExit as exc:
        # code of the user's or a plugin's called sys.exit(): a run that silently "succeeds"
        # with nothing printed or saved would be worse than an error saying who stopped it
        raise StepFailed(
            f"{_describe(exc)} was raised during {ctx.phase} (by the model's code or a "
            f"plugin, not by inferopt); {_interrupted(ctx).split(': ', 1)[1]}") from exc
    finally:
        if ctx.preparer is not None:  # artifacts a saved run kept were moved out already
            ctx.preparer.close()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "can't allocate memory" in text or "out of memory" in text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) (sys.exit() was called)"
    return f"{type(exc).__name__}: {exc}"


def _interrupted(ctx: RunContext) -> str:
    kept = "nothing was saved"
    if ctx.phase == "saved":
        return (f"interrupted after saving: {ctx.out_dir} holds the new run; stopped before the "
                "end-of-run hooks")
    if ctx.out_dir is not None:
        kept = (f"{ctx.out_dir} keeps its previous contents" if ctx.out_dir_existed
                else f"{ctx.out_dir} was not created")
    return (f"interrupted during {ctx.phase}: stopped cleanly; {kept}; no partial output was "
            "kept")


def _run_resolved(ctx: RunContext, model: Any, data: Any, registry: Registry,
                  manager: PluginManager, overwrite: bool) -> Report:
    recipe, log, out_dir, run_id = ctx.recipe, ctx.log, ctx.out_dir, ctx.run_id
    backend: Backend = ctx.backend.instance
    reason = backend.available()
    if reason:
        raise UsageError(f"backend {backend.name!r} cannot run here: {reason}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and backend.world_size == 1:
        raise UsageError(
            f"torchrun started {launched} processes but backend {backend.name!r} runs in one; "
            "use --backend data-parallel or --backend model-parallel under torchrun, or run "
            "without torchrun"
        )
    if not backend.is_main:
        out_dir = ctx.out_dir = None  # the main worker saves; the others measure with it

    import torch

    from inferopt._logging import quiet_library_tracebacks

    quiet_library_tracebacks()  # torch added its log handler on import
    torch.manual_seed(recipe.seed)
    source_ctx = SourceContext(log=log, batch_size=recipe.batch_size, seed=recipe.seed,
                               trust_model=recipe.trust_model)
    if model is None:
        assert ctx.model_source is not None
        ctx.phase = "loading the model"
        log.info("loading model", spec=recipe.model, source=ctx.model_source.plugin)
        model = ctx.model_source.obj().load(recipe.model, source_ctx)
    else:
        model = copy.deepcopy(model)
    _check_module(model, recipe.model)
    if data is None:
        assert ctx.data_spec is not None
        data_entry = resolve_model_source(registry, ctx.data_spec, kind="data source")
        ctx.phase = "loading the data"
        log.info("loading data", spec=ctx.data_spec, source=data_entry.plugin)
        data = data_entry.obj().load(ctx.data_spec, source_ctx)
    ctx.data = as_data(data, recipe.batch_size)
    if recipe.split is not None and ctx.data.eval:
        from inferopt._splits import split_data

        ctx.data = split_data(ctx.data, recipe.split, recipe.batch_size)
        log.info("data split", **recipe.split.to_dict(), description=ctx.data.description)
    if not ctx.data.eval:
        raise UsageError(f"--data {ctx.data_spec!r} gave no batches; it must yield at least one")
    from inferopt._data_checks import check_finite_inputs

    check_finite_inputs(ctx.data, str(ctx.data_spec))
    samples = ctx.data.num_samples
    if recipe.batch_size_explicit and recipe.batch_size > samples:
        raise UsageError(
            f"--batch-size {recipe.batch_size} is larger than the data: {ctx.data_spec!r} has "
            f"{samples} samples to measure on; give --batch-size {samples} or less (or more data)")
    _check_metrics_applicable(ctx)
    manager.notify("inferopt_run_start", _observer_error(ctx), run=run_info(ctx))

    probe = backend.to_device(ctx.data.eval[0].inputs)
    ctx.phase = "preparing the model on the backend"
    ctx.preparer = Preparer(backend, probe, log, ctx.warnings,
                            f" (plugin {ctx.backend.entry.plugin!r} from "
                            f"{_provider(ctx.backend.entry)})")
    try:
        prepared = ctx.preparer.prepare(model, "baseline")
    except InferoptError:
        raise
    except Exception as exc:  # a broken backend plugin is named, not a bare traceback
        raise PluginError(
            f"backend {backend.name!r} (plugin {ctx.backend.entry.plugin!r} from "
            f"{_provider(ctx.backend.entry)}) failed to prepare the model: "
            f"{type(exc).__name__}: {exc}") from exc
    try:
        probe_out = backend.forward(prepared, probe)
    except Exception as exc:
        if _out_of_memory(exc):
            raise  # said as such by run(), not as a shape problem
        raise UsageError(
            f"the model {recipe.model!r} failed on the first batch of {ctx.data_spec!r}: "
            f"{type(exc).__name__}: {exc}. Check that the data's shape and dtype fit the model"
        ) from exc
    from inferopt._model_io import all_finite, output_signature

    signature = output_signature(probe_out)
    if not all_finite(probe_out):
        raise UsageError(f"the baseline model {recipe.model!r} already gives non-finite outputs")
    if recipe.output:  # a wrong name fails here, before anything is measured
        from inferopt._model_io import select_output

        select_output(probe_out, recipe.output)
    from inferopt._data_checks import check_labels, classes_of
    from inferopt._model_io import primary_output

    check_labels(ctx.data, str(ctx.data_spec), classes_of(primary_output(probe_out,
                                                                         recipe.output)))
    try:
        baseline_outputs = backend.run_all(prepared, ctx.data.eval)
    except BatchFailed as exc:
        if isinstance(exc.cause, InferoptError) or _out_of_memory(exc.cause):
            raise exc.cause from None
        raise UsageError(
            f"the model {recipe.model!r} failed on batch {exc.index} of {ctx.data_spec!r}: "
            f"{type(exc.cause).__name__}: {exc.cause}. Check that every batch's shape and "
            "dtype fit"
        ) from exc
    ctx.phase = "measuring the baseline"
    log.info("measuring baseline", metrics=[m.spec.name for m in ctx.metrics])
    from inferopt._machine_load import LoadMonitor

    load = LoadMonitor()
    # interleaved A/B needs both models in one process; several workers measure each on its own
    paired = ({m.spec.name for m in ctx.metrics if m.instance.paired}
              if backend.world_size == 1 else set())
    baseline_model = _keep_baseline(ctx, model) if paired else None
    if baseline_model is None:
        paired = set()
    baseline, skipped = _measure(ctx, model, prepared, "baseline", baseline_outputs,
                                 skip=paired)
    baseline_prepared = prepared
    if baseline_model is not None:
        # the steps change the copy, so the prepared baseline stays as it was measured and
        # is not prepared again for the interleaved metrics
        model, baseline_model = baseline_model, model

    model, prepared, records = _run_steps(ctx, model, prepared, probe, signature, baseline,
                                          baseline_outputs)
    prepared = _prepare_optimized(ctx, model)

    ctx.phase = "measuring the optimized model"
    log.info("measuring optimized model")
    optimized, _ = _measure(ctx, model, prepared, "optimized", baseline_outputs, skip=paired)
    comparisons: dict[str, dict[str, Any]] = {}
    if paired:
        assert baseline_model is not None
        _measure_pairs(ctx, baseline_prepared, prepared, paired, baseline,
                       optimized, comparisons, skipped, baseline_outputs)
        order = [m.spec.name for m in ctx.metrics]
        baseline = {k: baseline[k] for k in order if k in baseline}
        optimized = {k: optimized[k] for k in order if k in optimized}
    environment_facts = environment(backend)  # after the run: facts such as peak GPU memory
    environment_facts["machine_load"], busy = load.stop()
    if busy is not None:
        ctx.warnings.append(busy)
        log.warning(busy)
    report = Report(
        run_id=run_id,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        recipe=_resolved_recipe(ctx),
        plugins=_plugins_used(ctx),
        baseline=baseline,
        optimized=optimized,
        comparisons=comparisons,
        steps=records,
        environment=environment_facts,
        skipped_metrics=skipped,
        warnings=ctx.warnings + [w for r in records for w in r.warnings],
        descriptions={m.spec.name: m.entry.obj.describe() for m in ctx.metrics},
        main_worker=backend.is_main,
        prepare_seconds=dict(ctx.preparer.seconds),
    )
    report.gates = _evaluate_gates(recipe, report)
    if out_dir is not None:
        from inferopt._artifacts import save_run

        ctx.phase = "saving"
        save_run(out_dir, model, report, ctx, overwrite=overwrite,
                 backend_artifacts=ctx.preparer)
        log.info("saved", dir=str(out_dir))
    manager.notify("inferopt_run_end", _observer_error(ctx), run=run_info(ctx),
                   report=report)
    return report


def _resolve_in_memory(
    recipe: Recipe, manager: PluginManager, registry: Registry, run_id: str, data: Any
) -> RunContext:
    if data is None and recipe.data is None:
        raise UsageError("a model passed as an nn.Module needs data: pass data=... or a data spec")
    ctx = RunContext(
        run_id,
        attrs.evolve(recipe, model="<in-memory module>"),
        manager,
        registry,
        get_logger(run_id=run_id),
        *resolve_plugins(recipe, registry),
    )
    ctx.data_spec = "<in-memory data>" if data is not None else recipe.data
    if data is None:
        resolve_model_source(registry, recipe.data or "", kind="data source")
    return ctx


def as_data(data: Data | Iterable[Any], batch_size: int) -> Data:
    """Accept :class:`Data`, a torch Dataset, or an iterable of batches."""
    if isinstance(data, Data):
        return data
    from inferopt._batching import batches_from

    return Data(eval=batches_from(data, batch_size, what="data"))


def _check_module(model: Any, spec: str) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module; "
            "the callable must return the model"
        )


def _check_metrics_applicable(ctx: RunContext) -> None:
    assert ctx.data is not None
    for m in ctx.metrics:
        if m.entry.obj.needs_labels and not ctx.data.has_labels and ctx.recipe.metrics_explicit:
            raise UsageError(
                f"metric {m.spec.name!r} needs labels but the data {ctx.data_spec!r} has none; "
                "give labelled data or use --metric fidelity to compare against the baseline"
            )


def _keep_baseline(ctx: RunContext, model: Any) -> Any:
    """A copy of the baseline model for metrics that measure both models together; None (and
    a warning) when the model cannot be copied, so those metrics measure each model alone."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # any failure to copy: fall back, never fail the run for it
        ctx.warnings.append(f"the baseline model could not be copied ({exc!r}), so it was "
                            "measured before the steps instead of interleaved with the result")
        return None


def _metric_context(ctx: RunContext, m: Resolved, role: str, model: Any,
                    baseline_outputs: list[Any]) -> MetricContext:
    from inferopt._artifacts import weights_bytes

    return MetricContext(
        log=ctx.log.bind(metric=m.spec.name, plugin=m.entry.plugin, role=role),
        role=role,
        baseline_outputs=baseline_outputs,
        saved_weights=lambda: weights_bytes(model),
        output=ctx.recipe.output,
    )


def _measure(
    ctx: RunContext, model: Any, prepared: Any, role: str, baseline_outputs: list[Any],
    skip: set[str] | None = None, only: set[str] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    assert ctx.data is not None
    backend: Backend = ctx.backend.instance
    # each worker measures its share of the eval data (all of it with one worker)
    share = backend.shard_indices(len(ctx.data.eval))
    data = Data(
        eval=[ctx.data.eval[i] for i in share],
        calibration=ctx.data.calibration,
        description=ctx.data.description,
        calibration_is_eval=ctx.data.calibration_is_eval,
    )
    outputs = [baseline_outputs[i] for i in share]
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for m in ctx.metrics:
        metric: Metric = m.instance
        if (skip and m.spec.name in skip) or (only is not None and m.spec.name not in only):
            continue
        if metric.needs_labels and not ctx.data.has_labels:
            skipped[m.spec.name] = f"the data {ctx.data_spec!r} has no labels"
            continue
        if _needs_modules(ctx, m, skipped):
            continue
        mctx = _metric_context(ctx, m, role, model, outputs)
        backend.gather(None)  # workers start each metric together (throughput runs concurrently)
        with _metric_errors(ctx, m, role, skipped):
            result = metric.measure(prepared, backend, data, mctx)
            _checked(ctx, m, result, f"on the {role}")
            results[m.spec.name] = backend.aggregate(metric, result)
    return results, skipped


def _measure_pairs(ctx: RunContext, base_prepared: Any, prepared: Any, names: set[str],
                   baseline: dict[str, Any], optimized: dict[str, Any],
                   comparisons: dict[str, Any], skipped: dict[str, str],
                   baseline_outputs: list[Any]) -> None:
    """Metrics that measure baseline and optimized together (interleaved timings)."""
    assert ctx.data is not None
    backend = ctx.backend.instance
    for m in ctx.metrics:
        if m.spec.name not in names:
            continue
        if m.instance.needs_labels and not ctx.data.has_labels:
            skipped[m.spec.name] = f"the data {ctx.data_spec!r} has no labels"
            continue
        if _needs_modules(ctx, m, skipped):
            continue
        mctx = _metric_context(ctx, m, "pair", prepared, baseline_outputs)
        with _metric_errors(ctx, m, "pair", skipped):
            result = m.instance.measure_pair(base_prepared, prepared, backend, ctx.data, mctx)
            if result is None:  # the metric chose to measure each model on its own
                for role, model, into in (("baseline", base_prepared, baseline),
                                          ("optimized", prepared, optimized)):
                    measured = m.instance.measure(
                        model, backend, ctx.data,
                        _metric_context(ctx, m, role, model, baseline_outputs))
                    _checked(ctx, m, measured, f"on the {role}")
                    into[m.spec.name] = measured
            else:
                if not isinstance(result, tuple | list) or len(result) != 3:
                    raise ValueError("measure_pair() must return (baseline, optimized, "
                                     f"comparison) or None, not {type(result).__name__}")
                for part, role in zip(result, ("baseline", "optimized", "comparison"),
                                      strict=True):
                    _checked(ctx, m, part, f"from measure_pair ({role})")
                baseline[m.spec.name], optimized[m.spec.name], comparisons[m.spec.name] = result


def _checked(ctx: RunContext, m: Resolved, result: Any, what: str) -> None:
    """A metric's result is checked where it enters the report (ValueError: the metric is
    skipped with a warning naming its plugin, see _metric_errors); NaNs are kept, and said."""
    from inferopt._metric_values import check_result

    for warning in check_result(result, f"metric {m.spec.name!r} {what}"):
        ctx.warnings.append(warning)
        ctx.log.warning(warning)


def _needs_modules(ctx: RunContext, m: Resolved, skipped: dict[str, str]) -> bool:
    """A metric that looks inside the torch model cannot measure what a backend runs when the
    backend does not expose it: skip it with the reason, rather than report zeros."""
    backend: Backend = ctx.backend.instance
    if not getattr(m.instance, "needs_modules", False) or getattr(backend, "exposes_modules",
                                                                   True):
        return False
    skipped[m.spec.name] = (f"not measurable on backend {backend.name!r}: it runs the model "
                            "as something other than torch modules, and this metric looks "
                            "inside the modules")
    return True


@contextlib.contextmanager
def _metric_errors(ctx: RunContext, m: Resolved, role: str,
                   skipped: dict[str, str]) -> Iterator[None]:
    try:
        yield
    except InferoptError as exc:
        if ctx.recipe.metrics_explicit:
            raise
        # a default metric that does not apply to this model: say so and go on
        skipped[m.spec.name] = str(exc)
    except Exception as exc:
        # a broken metric plugin costs its own numbers, not the run
        msg = (f"metric {m.spec.name!r} (plugin {m.entry.plugin!r} from {_provider(m.entry)}) "
               f"failed on the {role}: {exc!r}")
        ctx.log.error(msg)
        ctx.warnings.append(msg)
        skipped[m.spec.name] = msg


def _run_steps(ctx: RunContext, model: Any, prepared: Any, probe: Any, signature: Any,
               baseline: dict[str, dict[str, Any]], baseline_outputs: list[Any]
               ) -> tuple[Any, Any, list[StepRecord]]:
    """Apply the steps in order, checking after each that the outputs are finite, keep their
    shapes, and (with an accuracy budget) stay within it. A failure stops the run, or with
    ``keep_going`` is recorded, undone, and the next step runs."""
    backend: Backend = ctx.backend.instance
    records: list[StepRecord] = []
    for step in ctx.steps:
        ctx.phase = f"step {step.index} {step.spec.name!r}"
        refused = backend_refuses(backend, step.instance)
        if refused:  # skipped before it runs: the backend's limit, not the step's failure
            ctx.log.warning("step skipped: the backend cannot run its result",
                            step=step.index, optimizer=step.spec.name, reason=refused)
            records.append(StepRecord(
                index=step.index, name=step.spec.name, options=_options_of(step.instance),
                plugin=step.entry.plugin, distribution=step.entry.distribution,
                version=step.entry.version, kind=str(getattr(step.instance, "kind", "") or ""),
                refused=refused))
            continue
        before = _copy_for_undo(ctx, step, model) if ctx.recipe.keep_going else None
        try:
            new_model, rec = _apply_step(ctx, step, model)
            assert ctx.preparer is not None
            ctx.preparer.changed(model)  # the step may have changed it in place
            new_prepared = _prepare_stepped(ctx, step, new_model)
            _check_step(ctx, step, new_model, new_prepared, probe, signature, baseline,
                        baseline_outputs, rec.details)
        except InferoptError as exc:
            if before is None:
                raise
            ctx.log.error("step failed; undone (--keep-going)", step=step.index,
                          optimizer=step.spec.name, error=str(exc))
            records.append(StepRecord(
                index=step.index, name=step.spec.name, options=_options_of(step.instance),
                plugin=step.entry.plugin, distribution=step.entry.distribution,
                version=step.entry.version, kind=str(getattr(step.instance, "kind", "") or ""),
                failed=str(exc)))
            model, prepared = before, _prepare_optimized(ctx, before)
            continue
        model, prepared = new_model, new_prepared
        records.append(rec)
        ctx.manager.notify("inferopt_step_end", _observer_error(ctx), run=run_info(ctx),
                           step=rec)
    return model, prepared, records


def _prepare_optimized(ctx: RunContext, model: Any) -> Any:
    """The optimized model, prepared (from the cache when the last step's check prepared it)."""
    assert ctx.preparer is not None
    try:
        return ctx.preparer.prepare(model, "optimized")
    except InferoptError:
        raise
    except Exception as exc:
        raise PluginError(
            f"backend {ctx.backend.spec.name!r} (plugin {ctx.backend.entry.plugin!r} from "
            f"{_provider(ctx.backend.entry)}) failed to prepare the optimized model: "
            f"{type(exc).__name__}: {exc}") from exc


def _prepare_stepped(ctx: RunContext, step: Resolved, model: Any) -> Any:
    assert ctx.preparer is not None
    try:
        return ctx.preparer.prepare(model, "optimized")
    except InferoptError:
        raise
    except Exception as exc:  # the step left something the backend cannot take
        raise StepFailed(f"step {step.index} {step.spec.name!r} left a model the backend "
                         f"{ctx.backend.spec.name!r} cannot prepare: {type(exc).__name__}: "
                         f"{exc}") from exc


def _copy_for_undo(ctx: RunContext, step: Resolved, model: Any) -> Any:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # keep-going needs a copy to undo; without one, fail as usual
        ctx.warnings.append(f"--keep-going: the model could not be copied before step "
                            f"{step.index} {step.spec.name!r} ({exc!r}); a failure there "
                            "stops the run")
        return None


def _check_step(ctx: RunContext, step: Resolved, model: Any, prepared: Any, probe: Any,
                signature: Any, baseline: dict[str, dict[str, Any]],
                baseline_outputs: list[Any], details: dict[str, Any] | None = None) -> None:
    """The numeric guards after a step: finite outputs, same output shapes, accuracy budget.
    ``details`` are the step's own (its ``worst_layers`` name the suspects of a collapse)."""
    import torch

    from inferopt._model_io import all_finite, output_signature

    backend: Backend = ctx.backend.instance
    name = f"step {step.index} {step.spec.name!r}"
    try:
        with torch.inference_mode():
            out = backend.forward(prepared, probe)
    except Exception as exc:
        raise StepFailed(f"{name} left a model that fails on the first batch: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not all_finite(out):
        raise StepFailed(
            f"{name} made the model's outputs non-finite (NaN or inf) on the first batch"
            f"{_stopped(ctx)}. Try other options for this step, or skip the layers it breaks"
        )
    if output_signature(out) != signature:
        raise StepFailed(
            f"{name} changed the model's output shapes/dtypes from {signature} to "
            f"{output_signature(out)}; steps must keep the interface"
        )
    from inferopt._collapse import check_collapse

    check_collapse(ctx, step, name, out, baseline_outputs[0], _stopped(ctx), details)
    _check_accuracy_budget(ctx, name, model, prepared, baseline, baseline_outputs)


def _stopped(ctx: RunContext) -> str:
    """How a failed step's message ends: the run stops, or --keep-going undoes the step."""
    if ctx.recipe.keep_going:
        return "; the step was undone and the run went on (--keep-going)"
    return "; the run stopped there and nothing was saved"


def _check_accuracy_budget(ctx: RunContext, name: str, model: Any, prepared: Any,
                           baseline: dict[str, dict[str, Any]],
                           baseline_outputs: list[Any]) -> None:
    """With a quality budget (a gate on how much a ``quality`` metric may drop, such as
    ``max_accuracy_drop``), a step that takes the model past it stops the run there
    (``BudgetExceeded``, exit 1) instead of going on to measure and save a broken model."""
    from inferopt._contract import Gate, Quantity
    from inferopt._quantities import find_gate, format_value, gate_number

    descriptions = {m.spec.name: m.entry.obj.describe() for m in ctx.metrics}
    budgets: dict[str, list[tuple[str, Gate, float]]] = {}
    for gate_name, threshold in ctx.recipe.gates.to_dict().items():
        metric, doc = find_gate(gate_name, descriptions)
        gate = Gate.from_dict(doc)
        if (descriptions[metric].get("aspect") == "quality"
                and gate.kind in ("max_drop", "max_relative_drop")
                and isinstance(baseline.get(metric, {}).get(gate.quantity), int | float)):
            budgets.setdefault(metric, []).append((gate_name, gate, threshold))
    if not budgets:
        return
    results, _ = _measure(ctx, model, prepared, "guard", baseline_outputs, only=set(budgets))
    for metric, gates in budgets.items():
        over, first = [], None
        for _gate_name, gate, threshold in gates:
            q = Quantity.from_dict(descriptions[metric]["quantities"].get(gate.quantity, {}))
            b = baseline[metric][gate.quantity]
            o = results.get(metric, {}).get(gate.quantity)
            value = gate_number(gate, q, b, o, {})
            if value is None or value <= threshold:
                continue
            if gate.kind == "max_relative_drop":
                over.append(f"{value:.2f}% of the baseline (budget {threshold}%)")
            else:
                unit = "points" if q.change == "points" else q.unit
                over.append(f"{value:.2f} {unit}".rstrip() + f" (budget {threshold})")
            first = first or (q, gate.quantity, b, o)
        if first is not None:
            q, field, b, o = first
            raise BudgetExceeded(
                f"{name} dropped {q.label or f'{metric} {field}'} from "
                f"{format_value(b, q.unit)} to {format_value(o, q.unit)}: "
                f"{' and '.join(over)}{_stopped(ctx)}. Try milder options for this step (skip "
                "sensitive layers, lower sparsity, fine-tuning)")


def _apply_step(ctx: RunContext, step: Resolved, model: Any) -> tuple[Any, StepRecord]:
    import time

    import torch

    optimizer: Optimizer = step.instance
    log = ctx.log.bind(step=step.index, optimizer=step.spec.name, plugin=step.entry.plugin)
    # a step optimizes for where the optimized model runs (not the baseline's backend)
    backend = ctx.backend.instance
    sctx = StepContext(log=log, data=ctx.data,
                       backend=backend.main if isinstance(backend, BaselineElsewhere) else backend,
                       seed=ctx.recipe.seed, output=ctx.recipe.output,
                       trust_model=ctx.recipe.trust_model,
                       model_loader=model_loader(ctx.registry, log, ctx.recipe.seed,
                                                 ctx.recipe.trust_model))
    log.info("applying step", options=step.spec.options)
    torch.manual_seed(ctx.recipe.seed)
    start = time.perf_counter()
    try:
        new_model = optimizer.apply(model, sctx)
    except InferoptError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit() in a plugin is its failure, not ours
        raise StepFailed(
            f"step {step.index} {step.spec.name!r} (plugin {step.entry.plugin!r} from "
            f"{_provider(step.entry)}) failed: {_describe(exc)}"
        ) from exc
    seconds = time.perf_counter() - start
    if not isinstance(new_model, torch.nn.Module):
        raise StepFailed(
            f"step {step.index} {step.spec.name!r} returned {type(new_model).__name__}, "
            "not an nn.Module (plugin bug: apply() must return the model)"
        )
    log.info("step done", seconds=round(seconds, 3))
    record = StepRecord(
        index=step.index,
        name=step.spec.name,
        options=_options_of(optimizer),
        plugin=step.entry.plugin,
        distribution=step.entry.distribution,
        version=step.entry.version,
        seconds=seconds,
        details=sctx.details,
        warnings=list(sctx.warnings),
        state=sctx.state,
        kind=str(getattr(optimizer, "kind", "") or ""),
        optimizer_version=getattr(optimizer, "version", 1),
    )
    return new_model, record


def _options_of(plugin_object: Any) -> dict[str, Any]:
    """The options an attrs plugin instance was built with, as JSON-ready values."""
    cls = type(plugin_object)
    if not attrs.has(cls):
        return {}
    return {f.name: options.json_safe(getattr(plugin_object, f.name)) for f in attrs.fields(cls)}




def _observer_error(ctx: RunContext) -> Any:
    def record(plugin: str, exc: BaseException) -> None:
        msg = f"observer hook of plugin {plugin!r} raised {exc!r}; the run went on"
        ctx.log.warning(msg)
        ctx.warnings.append(msg)

    return record


def _resolved_recipe(ctx: RunContext) -> dict[str, Any]:
    recipe = ctx.recipe.to_dict()
    recipe["data"] = ctx.data_spec
    recipe["optimize"] = [str(s.spec) for s in ctx.steps]
    return recipe


def _plugins_used(ctx: RunContext) -> dict[str, dict[str, str]]:
    used: dict[str, dict[str, str]] = {}
    for r in [ctx.backend, *ctx.steps, *ctx.metrics]:
        used[r.entry.plugin] = r.provenance()
    if ctx.recipe.baseline_backend is not None:
        entry = ctx.registry.get("backend", ctx.recipe.baseline_backend.name)
        used[entry.plugin] = {"distribution": entry.distribution, "version": entry.version}
    sources = [ctx.model_source]
    if ctx.data_spec and not ctx.data_spec.startswith("<"):
        sources.append(resolve_model_source(ctx.registry, ctx.data_spec, kind="data source"))
    for entry in sources:
        if entry is not None:
            used[entry.plugin] = {"distribution": entry.distribution, "version": entry.version}
    return used


def _evaluate_gates(recipe: Recipe, report: Report) -> list[dict[str, Any]]:
    from inferopt._quantities import evaluate_gates

    return evaluate_gates(recipe.gates.to_dict(), report.descriptions, report.baseline,
                          report.optimized, report.comparisons)

