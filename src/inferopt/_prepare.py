"""Preparing models on the run's backend: once per model and role, untimed, with the backend's
artifacts staged for the run directory; and what a backend refuses to run.

The pipeline asks a :class:`Preparer` for every prepared model. It hands the backend a
:class:`~inferopt._contract.PrepareContext`, times the call (outside every measurement), keeps
the prepared object per model and role so that an unchanged model is never prepared twice, and
stages the files the backend writes with ``ctx.artifact_path`` until the run is saved.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from inferopt._contract import Backend, Optimizer, PrepareContext

ROLES = ("baseline", "optimized")
#: where a saved run keeps the backend's artifacts: ``backend/<role>/<name>``
ARTIFACTS_DIR = "backend"


def takes_context(backend: Backend) -> bool:
    """Whether ``backend.prepare`` accepts ``(model, ctx)``; False for the deprecated
    one-argument form ``prepare(self, model)`` of backends written before the context."""
    try:
        signature = inspect.signature(backend.prepare)
    except (TypeError, ValueError):  # a builtin or C callable: assume the current form
        return True
    positional = 0
    for p in signature.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2 or "ctx" in signature.parameters


def backend_refuses(backend: Backend, optimizer: Optimizer) -> str | None:
    """None when ``backend`` can run a model that ``optimizer`` produced; otherwise a sentence
    that names the backend and gives its reason (what the report and ``tune`` show)."""
    try:
        reason = backend.refuses(optimizer)
    except Exception as exc:  # a broken refuses() must not stop the run: take it as a refusal
        reason = f"its refuses() raised {type(exc).__name__}: {exc}"
    if not reason:
        return None
    return (f"backend {backend.name!r} cannot run models that {optimizer.name!r} produces: "
            f"{reason}")


class Preparer:
    """Prepares models on one run's backend.

    ``prepare(model, role)`` returns the backend's prepared object, from the cache when this
    model object was already prepared for this role and has not changed since (a step that
    may have changed it in place calls :meth:`changed`). ``seconds[role]`` is how long the last
    prepare of each role took (the prepare of the model that was measured).
    """

    def __init__(self, backend: Backend, example_inputs: Any, log: Any,
                 warnings: list[str], describe_plugin: str = "") -> None:
        self.backend = backend
        self.example_inputs = example_inputs
        self.log = log
        self.warnings = warnings
        self.staging = Path(tempfile.mkdtemp(prefix="inferopt-backend-artifacts-"))
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self._cache: dict[str, tuple[Any, Any]] = {}  # role -> (model, prepared)
        self._with_context = takes_context(backend)
        if not self._with_context:
            message = (f"backend {backend.name!r}{describe_plugin} implements prepare(model) "
                       "without a context; that form is deprecated: accept "
                       "prepare(self, model, ctx) (see inferopt.PrepareContext)")
            warnings.append(message)
            log.warning(message)

    def prepare(self, model: Any, role: str) -> Any:
        cached = self._cache.get(role)
        if cached is not None and cached[0] is model:
            return cached[1]
        folder = self.staging / role
        if folder.exists():  # only the last prepare of a role is kept
            shutil.rmtree(folder, ignore_errors=True)
        log = self.log.bind(role=role, backend=self.backend.name)
        ctx = PrepareContext(example_inputs=self.example_inputs, role=role, log=log,
                             artifact_dir=folder)
        start = time.perf_counter()
        if self._with_context:
            prepared = self.backend.prepare(model, ctx)
        else:
            prepared = self.backend.prepare(model)  # type: ignore[call-arg]
        self.backend.synchronize()
        seconds = time.perf_counter() - start
        log.info("prepared", seconds=round(seconds, 4))
        self.seconds[role] = seconds
        self.count[role] = self.count.get(role, 0) + 1
        self.warnings.extend(f"backend {self.backend.name!r} ({role}): {w}"
                             for w in ctx.warnings)
        self._cache[role] = (model, prepared)
        return prepared

    def changed(self, model: Any) -> None:
        """``model`` may have changed in place (a step ran on it): prepare it afresh."""
        for role, (cached, _) in list(self._cache.items()):
            if cached is model:
                del self._cache[role]

    def artifacts(self) -> dict[str, list[str]]:
        """The staged files per role, as paths relative to the role's folder."""
        out: dict[str, list[str]] = {}
        for role in ROLES:
            folder = self.staging / role
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                           if p.is_file()) if folder.is_dir() else []
            if files:
                out[role] = files
        return out

    def move_into(self, run_dir: Path, final_dir: Path) -> dict[str, dict[str, str]]:
        """Move the staged artifacts into ``run_dir`` (a run directory being written) and
        return their listing for the report: role -> name -> path under ``final_dir``."""
        listing: dict[str, dict[str, str]] = {}
        for role, names in self.artifacts().items():
            (run_dir / ARTIFACTS_DIR).mkdir(exist_ok=True)
            shutil.move(str(self.staging / role), str(run_dir / ARTIFACTS_DIR / role))
            listing[role] = {name: str(final_dir / ARTIFACTS_DIR / role / name)
                             for name in names}
        return listing

    def close(self) -> None:
        """Delete the staging folder (a run that does not save keeps no artifact)."""
        shutil.rmtree(self.staging, ignore_errors=True)


class _OnBaselineBackend:
    """A baseline prepared by the run's ``baseline_backend``: its forward goes there. Metrics
    that look inside a torch model (its ``parameters()``, ...) see the wrapped object."""

    def __init__(self, prepared: Any) -> None:
        self.prepared = prepared

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["prepared"], name)


class BaselineElsewhere(Backend):
    """The run's backend with the baseline prepared and run on another one (the recipe's
    ``baseline_backend``): the optimized model is measured where it will be deployed, against
    the model as its user runs it today, in the same interleaved A/B runs. Everything but the
    baseline's prepare and forward is the run's backend's.

    Backends that set torch's thread count when they prepare (``cpu:threads=N``) would leave
    it set for the other: each role is prepared from the thread count the run started with,
    and each forward runs with the count its backend's prepare left."""

    def __init__(self, main: Backend, baseline: Backend, baseline_plugin: str = "") -> None:
        import torch

        self.main, self.baseline, self.baseline_plugin = main, baseline, baseline_plugin
        self.name = main.name  # type: ignore[misc]
        self.exposes_modules = (  # type: ignore[misc]
            getattr(main, "exposes_modules", True) and getattr(baseline, "exposes_modules", True))
        self._start_threads = torch.get_num_threads()
        self._threads: dict[bool, int] = {}  # on the baseline's backend -> torch threads

    def available(self) -> str | None:
        return self.main.available() or (
            f"the baseline's backend {self.baseline.name!r}: {reason}"
            if (reason := self.baseline.available()) else None)

    def refuses(self, optimizer: Optimizer) -> str | None:
        return self.main.refuses(optimizer)

    @property
    def device(self) -> str:
        return self.main.device

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        import torch

        on_baseline = ctx.role == "baseline"
        backend = self.baseline if on_baseline else self.main
        torch.set_num_threads(self._start_threads)
        if takes_context(backend):
            call = lambda: backend.prepare(model, ctx)  # noqa: E731
        else:
            ctx.warn(f"backend {backend.name!r} implements prepare(model) without a context; "
                     "that form is deprecated: accept prepare(self, model, ctx)")
            call = lambda: backend.prepare(model)  # type: ignore[call-arg]  # noqa: E731
        try:
            prepared = call()
        except Exception as exc:
            if not on_baseline:
                raise
            raise RuntimeError(f"the baseline's backend {backend.name!r} "
                               f"({self.baseline_plugin}) failed: {type(exc).__name__}: "
                               f"{exc}") from exc
        self._threads[on_baseline] = torch.get_num_threads()
        return _OnBaselineBackend(prepared) if on_baseline else prepared

    def to_device(self, obj: Any) -> Any:
        return self.main.to_device(obj)

    def forward(self, prepared: Any, inputs: Any) -> Any:

        on_baseline = isinstance(prepared, _OnBaselineBackend)
        self._use_threads(on_baseline)
        if on_baseline:
            return self.baseline.forward(prepared.prepared, inputs)
        return self.main.forward(prepared, inputs)

    def synchronize(self) -> None:
        self.main.synchronize()
        self.baseline.synchronize()

    def describe(self) -> dict[str, Any]:
        facts = {}
        for on_baseline, backend in ((True, self.baseline), (False, self.main)):
            self._use_threads(on_baseline)  # each says the thread count it ran with
            facts[on_baseline] = backend.describe()
        return {**facts[False], "baseline_backend": facts[True]}

    def _use_threads(self, on_baseline: bool) -> None:
        import torch

        threads = self._threads.get(on_baseline)
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
