"""The base classes plugins implement, and the data objects that cross plugin boundaries.

Importing this module does not import torch: plugin modules subclass these at import time and
must stay cheap to list. Torch is imported inside the methods that do the work.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    import torch
    from structlog.typing import FilteringBoundLogger


# --- data ------------------------------------------------------------------------------------


@attrs.define
class Batch:
    """One batch. ``inputs`` is a tensor (``model(x)``), a tuple (``model(*x)``) or a dict
    (``model(**x)``); ``labels`` is an optional tensor of class indices."""

    inputs: Any
    labels: Any = None

    @property
    def size(self) -> int:
        """Number of samples: the first dimension of the first tensor in ``inputs``."""
        from inferopt._model_io import first_tensor

        tensor = first_tensor(self.inputs)
        return int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else 1


@attrs.define
class Data:
    """The run's data: ``eval`` batches are measured; ``calibration`` batches are what
    calibrating optimizers (static quantization, GPTQ, SmoothQuant) observe; ``train`` batches
    are what training optimizers (distillation) learn from. When a source has no separate
    calibration split, calibration is the eval data, and says so; when it has no separate
    training split, training uses the calibration batches."""

    eval: list[Batch]
    calibration: list[Batch] = attrs.field(factory=list)
    description: str = ""
    calibration_is_eval: bool = False
    train: list[Batch] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        if not self.calibration:
            self.calibration = self.eval
            self.calibration_is_eval = True
        if not self.train:
            self.train = self.calibration

    @property
    def train_is_eval(self) -> bool:
        """Whether the training batches are the measured ones (results would be optimistic)."""
        return self.train is self.eval or (self.train is self.calibration
                                           and self.calibration_is_eval)

    @property
    def has_labels(self) -> bool:
        return bool(self.eval) and all(b.labels is not None for b in self.eval)

    @property
    def num_samples(self) -> int:
        return sum(b.size for b in self.eval)


@attrs.define
class StepContext:
    """What an optimizer step gets besides the model.

    ``data`` is None when a saved model is being rebuilt (``restoring``); ``trust_model`` is
    True only when the user said they trust the model code (``--trust-model``,
    ``trust_model=True``): a step that loads a model of its own (distill's ``student=``) passes
    it on, and while restoring refuses sources that run code without it; ``output`` names the
    output tensor to compare (the run's ``--output``; None: logits, else the first tensor; see
    :func:`inferopt._model_io.primary_output`); ``state`` is a
    JSON-serialisable dict the step may fill during ``apply`` and that is handed back,
    unchanged, to ``restore`` when the saved model is loaded (for example which channels a
    structured pruning step kept). ``details`` goes into the report; a ``"summary"`` string in it
    is also printed under the step in the terminal table.
    """

    log: FilteringBoundLogger
    data: Data | None = None
    backend: Backend | None = None
    seed: int = 0
    restoring: bool = False
    output: str | None = None
    state: dict[str, Any] = attrs.field(factory=dict)
    details: dict[str, Any] = attrs.field(factory=dict)
    warnings: list[str] = attrs.field(factory=list)
    trust_model: bool = False
    #: loads another model from a spec through the run's own model sources and plugins (what
    #: distillation's ``student=`` uses); None where no sources are at hand
    model_loader: Callable[[str], Any] | None = None
    #: when restoring: the ``Optimizer.version`` that saved ``state`` (runs saved before
    #: versions existed: 1); None otherwise
    saved_version: int | None = None

    def load_model(self, spec: str, what: str = "a model spec") -> torch.nn.Module:
        """Another model, from a model spec (``python:pkg.mod:build``, ``hf:DIR``...), built by
        the same plugins as the run's model. Its weights are expected to be trained or loaded
        by the step, so sources may skip their own training (as when restoring). When a saved
        run is being rebuilt, sources that run code need ``trust_model``; ``what`` names the
        option the spec came from, for that message."""
        if self.model_loader is None:
            from ._errors import UsageError

            raise UsageError(f"model {spec!r} cannot be loaded here: this step was called "
                             "without a session to load models with")
        return self.model_loader(spec, what)

    def warn(self, message: str) -> None:
        """Record a warning that the report shows (and log it)."""
        self.warnings.append(message)
        self.log.warning(message)

    def require_data(self, step: str) -> Data:
        if self.data is None:
            from inferopt._errors import UsageError

            raise UsageError(f"{step} needs data (calibration batches); give --data")
        return self.data


@attrs.frozen
class RunInfo:
    """What lifecycle hooks (``inferopt_run_start``, ``inferopt_step_end``, ``inferopt_run_end``)
    see of a run: a frozen view, not the orchestrator. ``recipe`` is the resolved recipe as plain
    data; ``warn(message)`` adds a warning to the run's report (and logs it)."""

    run_id: str
    recipe: dict[str, Any]
    model: str
    data: str | None
    backend: str
    steps: tuple[str, ...]
    metrics: tuple[str, ...]
    out_dir: Any
    log: FilteringBoundLogger
    warn: Callable[[str], None]


def _default_log() -> FilteringBoundLogger:
    from inferopt._logging import get_logger

    return get_logger()


@attrs.define
class PrepareContext:
    """What :meth:`Backend.prepare` gets besides the model.

    ``example_inputs`` are the inputs of the run's first eval batch, already on the backend's
    device (trace, export or warm up with them); ``role`` is ``"baseline"`` or ``"optimized"``
    (the model the steps produced); ``log`` is a logger bound to the run and role;
    :meth:`warn` adds a warning to the report. :meth:`artifact_path` gives a path where the
    backend may write what it built (``model.onnx``, an engine); the run moves these files
    into its directory as ``backend/<role>/<name>`` and lists them in the report.

    Every field has a default so that a plugin's own tests can build one:
    ``PrepareContext(example_inputs=x)``; artifacts then go to a temporary folder.
    """

    example_inputs: Any = None
    role: str = "baseline"
    log: FilteringBoundLogger = attrs.field(factory=_default_log)
    #: where this prepare's artifacts are staged (None: a temporary folder, made on first use)
    artifact_dir: Path | None = None
    warnings: list[str] = attrs.field(factory=list)

    def warn(self, message: str) -> None:
        """Record a warning that the report shows (and log it)."""
        self.warnings.append(message)
        self.log.warning(message)

    def artifact_path(self, name: str) -> Path:
        """A path for the artifact ``name`` (``"model.onnx"``, ``"engine/plan.bin"``): write
        the file there during ``prepare``. A run that saves moves it into its directory at
        ``backend/<role>/<name>``; a run that does not save (``save=False``) deletes it at the
        end. Only the last prepare of each role is kept: the one whose model was measured."""
        from inferopt._errors import PluginError

        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or any(
                p in ("", ".", "..") or ":" in p for p in parts):
            raise PluginError(f"artifact name {name!r} must be a relative path such as "
                              "'model.onnx' or 'engine/plan.bin', without '..'")
        if self.artifact_dir is None:
            import tempfile

            self.artifact_dir = Path(tempfile.mkdtemp(prefix="inferopt-artifacts-"))
        path = self.artifact_dir.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


class BatchFailed(Exception):
    """The model raised on eval batch ``index`` (``cause``) in :meth:`Backend.run_all`."""

    def __init__(self, index: int, cause: Exception) -> None:
        super().__init__(f"batch {index}: {type(cause).__name__}: {cause}")
        self.index = index
        self.cause = cause


# --- how a metric describes its numbers ------------------------------------------------------

#: how a change from baseline to optimized is shown: ``speedup`` baseline/optimized ("x1.52
#: faster"), ``ratio`` optimized/baseline ("x1.20"), ``percent`` optimized as a share of the
#: baseline ("25.0%"), ``points`` (optimized - baseline) x 100 for fractions ("-0.40 pts"),
#: ``difference`` optimized - baseline
CHANGES = ("speedup", "ratio", "percent", "points", "difference")
#: what a gate bounds: ``min_``/``max_`` on the ``change`` (in the quantity's change kind), the
#: optimized ``value``, the ``drop`` (how much worse, in the change's units: points for a
#: fraction), or the ``relative_drop`` (how much worse, in percent of the baseline)
#: what a metric tells about a model (:attr:`Metric.aspect`)
ASPECTS = ("speed", "size", "quality")
GATE_KINDS = tuple(f"{bound}_{on}" for bound in ("min", "max")
                   for on in ("change", "value", "drop", "relative_drop"))


@attrs.frozen
class Quantity:
    """What one number of a metric's result means, for the report, ``compare``, gates and
    ``tune --objective``.

    ``unit`` is how values are shown (``ms``, ``bytes``, ``fraction`` shown as a percentage,
    ``samples/s``, ``count``, ``dB``, or any other text written after the number); ``better``
    says which way is good (``"lower"``, ``"higher"`` or None when neither is); ``change`` how
    a change is shown (one of :data:`CHANGES`, None: not compared); ``label`` the row's name in
    tables (default: ``"METRIC FIELD"``); ``show`` whether the terminal table and Markdown show
    it (it is in report.json either way). A field name ending in ``*`` describes every field
    it prefixes (``samples_per_s_batch*``); ``{}`` in the label is replaced by the rest.
    ``same_within`` is the largest absolute change still judged "same" rather than better or
    worse (a cosine of 0.99998 against 1.0 is no measurable change; default 0: any change);
    ``same_within_relative`` the same as a share of the baseline (0.05: within 5%).
    ``words`` are what the report's verdict says for better, worse and same (latency's
    ``faster``/``slower``/``no measurable change``).
    """

    unit: str = ""
    better: str | None = attrs.field(default=None)
    change: str | None = attrs.field(default=None)
    label: str = ""
    show: bool = True
    same_within: float = 0.0
    same_within_relative: float = 0.0
    words: tuple[str, str, str] = attrs.field(default=("better", "worse", "same"),
                                              converter=tuple)

    @words.validator
    def _check_words(self, _attr: Any, value: tuple[str, ...]) -> None:
        if len(value) != 3 or not all(isinstance(w, str) and w for w in value):
            raise ValueError(f"Quantity(words={value!r}): give three words, for better, worse "
                             "and same")

    @better.validator
    def _check_better(self, _attr: Any, value: str | None) -> None:
        if value not in (None, "lower", "higher"):
            raise ValueError(f"Quantity(better={value!r}): give 'lower', 'higher' or None")

    @change.validator
    def _check_change(self, _attr: Any, value: str | None) -> None:
        if value is not None and value not in CHANGES:
            raise ValueError(f"Quantity(change={value!r}): give one of {', '.join(CHANGES)} "
                             "or None")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Quantity:
        known = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


@attrs.frozen
class Gate:
    """A threshold a metric offers (``--gate NAME=VALUE``): the run exits 1 when the number
    ``kind`` names, computed from ``quantity`` (a field of the metric's result), is past it.

    ``kind`` is one of :data:`GATE_KINDS` (``min_change``: at least this change, as
    ``min_speedup``; ``max_drop``: at most this much worse, as ``max_accuracy_drop``);
    ``comparison`` names a key of the metric's paired comparison (:meth:`Metric.measure_pair`)
    that measures the same number more fairly, used when present (latency's interleaved
    ``speedup``); ``help`` says what the threshold means, for ``inferopt plugins``.
    """

    quantity: str
    kind: str = attrs.field()
    help: str = ""
    comparison: str | None = None
    #: the name under which the report's verdict publishes this gate's number on every run,
    #: set or not (latency's ``speedup``, size's ``size_ratio``); None: only when it is set
    reported_as: str | None = None

    @kind.validator
    def _check_kind(self, _attr: Any, value: str) -> None:
        if value not in GATE_KINDS:
            raise ValueError(f"Gate(kind={value!r}): give one of {', '.join(GATE_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Gate:
        known = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


# --- plugin classes --------------------------------------------------------------------------


class Optimizer(abc.ABC):
    """A technique that turns a model into a cheaper one.

    Subclasses are attrs classes (``@attrs.frozen``) whose fields, declared with
    :func:`inferopt.option`, are the technique's options.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: what kind of technique this is: "quantization", "pruning", "distillation" or anything
    #: else; the report's verdict uses it to say "quantized but not smaller", "pruned but not
    #: faster"
    kind: ClassVar[str] = ""
    #: the version of what this optimizer saves (``ctx.state`` and the structure ``restore``
    #: rebuilds), stored with it in the run's ``inferopt.json``; raise it when that changes
    version: ClassVar[int] = 1
    #: the saved versions ``restore`` can read (``ctx.saved_version`` says which one it got);
    #: None means every version from 1 to :attr:`version`. ``inferopt.load`` refuses others
    #: with a message naming the step and both versions
    reads_versions: ClassVar[Collection[int] | None] = None

    @abc.abstractmethod
    def apply(self, model: torch.nn.Module, ctx: StepContext) -> torch.nn.Module:
        """Return the optimized model (the input may be modified in place and returned)."""

    def restore(self, model: torch.nn.Module, ctx: StepContext) -> torch.nn.Module:
        """Rebuild the structure this step produces, so that saved weights can be loaded into it.

        Called by :func:`inferopt.load` with ``ctx.restoring`` True, ``ctx.data`` None and
        ``ctx.state`` as saved. The default re-applies the step, which suits steps whose
        structure does not depend on data; others override it.
        """
        return self.apply(model, ctx)


class Backend(abc.ABC):
    """Where a model runs. Subclasses are attrs classes; their fields are options.

    :meth:`prepare` turns the torch model into whatever the backend runs (the module itself,
    a compiled module, a runtime session); the pipeline and the metrics only hand that object
    back to :meth:`forward`. Preparing is not timed, so compile, export and warm up there.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: True when the prepared object is the torch module (or offers its ``parameters()``,
    #: ``buffers()`` and ``state_dict()``), so metrics that look inside it can run; a backend
    #: whose prepared object is something else (a runtime session) sets it False, and metrics
    #: with ``needs_modules`` are skipped with that reason instead of reporting 0
    exposes_modules: ClassVar[bool] = True

    def available(self) -> str | None:
        """None when this backend can run here; otherwise the reason it cannot."""
        return None

    def refuses(self, optimizer: Optimizer) -> str | None:
        """None when this backend can run a model that ``optimizer`` produced; otherwise the
        reason it cannot (say what to do instead). The run skips such a step before applying
        it, and the report blames the backend, not the step. The default refuses nothing."""
        return None

    @property
    def device(self) -> str:
        return "cpu"

    @abc.abstractmethod
    def prepare(self, model: torch.nn.Module, ctx: PrepareContext) -> Any:
        """Make ``model`` ready to run here (move it, put it in inference mode, compile or
        export it) and return what :meth:`forward` runs. Called once per model and role
        (``ctx.role``), outside every timing. ``prepare(self, model)`` without ``ctx`` still
        works but is deprecated."""

    def to_device(self, obj: Any) -> Any:
        from inferopt._model_io import move_to

        return move_to(obj, self.device)

    def forward(self, prepared: Any, inputs: Any) -> Any:
        """Run one batch of inputs (already on the device) through what :meth:`prepare`
        returned and return the model's outputs."""
        import torch

        from inferopt._model_io import call_model

        with torch.inference_mode():
            return call_model(prepared, inputs)

    def synchronize(self) -> None:
        """Wait until queued work has finished (a no-op on CPU)."""
        return None

    def time(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn`` takes on this device, synchronized on both sides."""
        import time

        self.synchronize()
        start = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        """Hardware and software facts for the report."""
        return {"backend": self.name}

    # --- several workers (torchrun) --------------------------------------------------------
    # A backend whose processes were started by torchrun runs the whole pipeline in every
    # process ("worker"). These methods say how the workers share the work; the defaults are
    # those of a single process, so single-device backends need none of them.

    @property
    def rank(self) -> int:
        """This worker's index among ``world_size`` workers (0 for a single process)."""
        return 0

    @property
    def world_size(self) -> int:
        """How many processes run this pipeline together (1 unless launched by torchrun)."""
        return 1

    @property
    def is_main(self) -> bool:
        """Whether this worker prints the report and writes the output directory."""
        return self.rank == 0

    def shard_indices(self, num_batches: int) -> list[int]:
        """Which of the ``num_batches`` eval batches this worker runs and measures (all of
        them by default; a data-parallel backend gives each worker its own share)."""
        return list(range(num_batches))

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's ``obj``, in rank order. A collective: all workers call it, in the
        same order, and it returns once all have (so it also lines them up)."""
        return [obj]

    def run_all(self, prepared: Any, batches: list[Batch]) -> list[Any]:
        """Outputs of every batch, on the CPU and in the order given: each worker runs its
        :meth:`shard_indices` and the outputs are gathered, so every worker gets them all."""
        from inferopt._model_io import move_to

        mine = {}
        for i in self.shard_indices(len(batches)):
            try:
                mine[i] = move_to(self.forward(prepared, self.to_device(batches[i].inputs)), "cpu")
            except Exception as exc:
                raise BatchFailed(i, exc) from exc
        if len(mine) == len(batches):
            # this worker ran them all (one process, or every process runs every batch, as
            # in a pipeline of stages): nothing to gather
            return [mine[i] for i in range(len(batches))]
        outputs: dict[int, Any] = {}
        for part in self.gather(mine):
            for i, out in part.items():
                if i in outputs:
                    raise RuntimeError(f"batch {i} was run by two workers; shard_indices overlap")
                outputs[i] = out
        missing = sorted(set(range(len(batches))) - set(outputs))
        if missing:
            raise RuntimeError(f"no worker ran batches {missing}; shard_indices miss them")
        return [outputs[i] for i in range(len(batches))]

    def aggregate(self, metric: Metric, result: dict[str, Any]) -> dict[str, Any]:
        """Turn this worker's ``result`` of ``metric`` into the run's result (the same on
        every worker). The default, one worker, keeps it; a data-parallel backend gathers all
        workers' results and lets :meth:`Metric.combine` merge them."""
        return result


class Metric(abc.ABC):
    """Something measured on the baseline and on the optimized model alike.

    ``measure`` returns a flat dict of numbers; ``primary`` names the main field,
    ``higher_is_better`` says which way is good. ``quantities`` describes the fields the report
    shows (field name -> :class:`Quantity`); a metric that declares none is shown by its
    ``primary`` field, with ``unit`` and ``higher_is_better``. ``gates`` are the thresholds it
    offers (gate name -> :class:`Gate`), for ``--gate NAME=VALUE``; gate names are unique
    among installed metrics.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    unit: ClassVar[str] = ""
    primary: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False
    #: True when ``measure`` looks inside the prepared model (its parameters, buffers or
    #: modules) instead of only running it through ``backend.forward``: the metric is then
    #: skipped, with the reason in the report, on a backend that does not expose modules
    needs_modules: ClassVar[bool] = False

    quantities: ClassVar[dict[str, Quantity]] = {}
    gates: ClassVar[dict[str, Gate]] = {}
    #: what this metric tells about a model, for the report's findings, the accuracy budget
    #: and plots: ``speed``, ``size``, ``quality`` (one of :data:`ASPECTS`), or None
    aspect: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        aspect = cls.__dict__.get("aspect")
        if aspect is not None and aspect not in ASPECTS:
            raise TypeError(f"metric {cls.__name__}: aspect {aspect!r} is not one of "
                            f"{', '.join(ASPECTS)} (or None)")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """This metric's self-description, as the report stores it: its quantities (the
        declared ones, or its primary field) and gates, as plain data."""
        quantities = dict(cls.quantities)
        if not quantities and cls.primary:
            quantities = {cls.primary: Quantity(
                unit=cls.unit, better="higher" if cls.higher_is_better else "lower",
                change="difference")}
        if cls.aspect is not None and cls.aspect not in ASPECTS:
            raise ValueError(f"metric {getattr(cls, 'name', cls.__name__)!r}: aspect "
                             f"{cls.aspect!r} is not one of {', '.join(ASPECTS)}")
        return {"primary": cls.primary, "aspect": cls.aspect,
                "quantities": {k: q.to_dict() for k, q in quantities.items()},
                "gates": {k: g.to_dict() for k, g in cls.gates.items()}}

    @abc.abstractmethod
    def measure(
        self, model: torch.nn.Module, backend: Backend, data: Data, ctx: MetricContext
    ) -> dict[str, Any]:
        """Measure ``model`` (already prepared on ``backend``) on ``data``."""

    @property
    def paired(self) -> bool:
        """True when :meth:`measure_pair` measures this metric; the pipeline then keeps a copy
        of the baseline model until the optimized one is measured."""
        return False

    def measure_pair(
        self, baseline: torch.nn.Module, optimized: torch.nn.Module, backend: Backend,
        data: Data, ctx: MetricContext,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        """Measure both models together, for metrics whose comparison is only fair when the
        two share the same conditions (timings: run them alternately). Return ``(baseline
        result, optimized result, comparison)``, the comparison holding at least ``verdict``;
        or None to be measured by :meth:`measure` on each model instead."""
        return None
    def combine(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Merge the results of several data-parallel workers, each measured on its own share
        of the data at the same time, into one. The default keeps a result all workers agree
        on; otherwise it averages each number over the workers and adds ``workers``. Metrics
        whose numbers add up (counts, samples per second) override it."""
        if all(r == results[0] for r in results):
            return dict(results[0])
        merged: dict[str, Any] = {}
        for key, value in results[0].items():
            values = [r.get(key) for r in results]
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if len(numbers) == len(values):
                merged[key] = sum(numbers) / len(numbers)
            else:
                merged[key] = value
        merged["workers"] = len(results)
        return merged


@attrs.define
class MetricContext:
    """What a metric gets besides model, backend and data. ``output`` names the output tensor
    to compare (the run's ``--output``); pass it to :func:`inferopt._model_io.primary_output`."""

    log: FilteringBoundLogger
    role: str  # "baseline" or "optimized"
    baseline_outputs: list[Any] | None = None
    saved_weights: Callable[[], bytes] | None = None
    output: str | None = None


class ModelSource(abc.ABC):
    """Turns a model spec (``demo:digits-mlp``, ``python:pkg.mod:build``) into an nn.Module."""

    scheme: ClassVar[str]
    summary: ClassVar[str] = ""
    #: Whether loading a spec may run code that is not inferopt's or torch's own: import a
    #: module, call a function, unpickle. :func:`inferopt.load` refuses a saved run whose
    #: ``inferopt.json`` names such a source unless the user passes ``trust_model=True``: a
    #: saved file never grants trust by itself. True unless a source says otherwise, so a
    #: source is treated as data-only (``demo:``, ``hf:DIR``) only when it declares it.
    runs_code: ClassVar[bool] = True
    #: the attrs class (fields made with :func:`inferopt.option`) that the spec's ``key=value``
    #: options are built into with :func:`inferopt.utils.build_options`, so that
    #: ``inferopt plugins`` lists them; None: the spec takes no such options
    spec_options: ClassVar[type | None] = None

    def claims(self, spec: str) -> bool:
        """Whether this source reads ``spec`` although it has no ``scheme:`` prefix."""
        return False

    @abc.abstractmethod
    def load(self, spec: str, ctx: SourceContext) -> torch.nn.Module:
        """Build or load the model."""

    def default_data(self, spec: str) -> str | None:
        """A data spec that suits this model when the user gives none (for demos)."""
        return None

    def portable_spec(self, spec: str) -> str:
        """``spec`` as saved with an optimized model, for :func:`inferopt.load`: file paths made
        absolute so that it loads from any working directory."""
        return spec


class DataSource(abc.ABC):
    """Turns a data spec (``demo:digits``, ``synthetic:shape=64x1024``) into :class:`Data`."""

    scheme: ClassVar[str]
    summary: ClassVar[str] = ""
    #: as :attr:`ModelSource.spec_options`: the attrs class of the spec's ``key=value`` options
    spec_options: ClassVar[type | None] = None

    def claims(self, spec: str) -> bool:
        return False

    @abc.abstractmethod
    def load(self, spec: str, ctx: SourceContext) -> Data:
        """Load the data, batched with ``ctx.batch_size`` where the source does the batching."""


@attrs.define
class SourceContext:
    """What model and data sources get: batch size, seed, logger, and whether a saved model is
    being rebuilt (then weights are loaded afterwards, so a source may skip training).

    ``trust_model`` is True only when the user said they trust the model file (``--trust-model``):
    only then may a source unpickle it. ``tokenizer`` is set by a model source whose model comes
    with one (``hf:``), before the data is loaded, so that text data can be tokenized for it.
    """

    log: FilteringBoundLogger
    batch_size: int = 64
    seed: int = 0
    restoring: bool = False
    trust_model: bool = False
    tokenizer: Any = None
