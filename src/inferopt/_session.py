"""A Session: one plugin manager, the registry its plugins build, and the Python API on top.

``inferopt.run/apply/load`` are calls on a default Session made on first use. A Session of
your own adds plugins in code (``session.register(module, name="mine")``, what a plugin's
tests do) and every call on it (``run``, ``apply``, ``load``, a step's ``ctx.load_model``)
sees them. Importing this module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from inferopt._contract import Backend, Data, Optimizer, StepContext
from inferopt._errors import PluginError, UsageError
from inferopt._logging import get_logger
from inferopt._manager import (
    ENV_ALLOW,
    ENV_BLOCK,
    ENV_STRICT,
    PluginManager,
    _entry_points,
)
from inferopt._registry import KINDS, Registry

from . import _options as options

if TYPE_CHECKING:
    import torch

    from inferopt._report import Report


class Session:
    """Installed plugins, plus the ones registered in code, and the API that uses them.

    ``strict`` (default: ``INFEROPT_STRICT_PLUGINS``) makes a plugin that fails to load an
    error; ``plugins`` limits the entry points loaded to these names (default:
    ``INFEROPT_PLUGINS``, else all of them; ``INFEROPT_BLOCK_PLUGINS`` still applies).
    """

    def __init__(self, *, strict: bool | None = None,
                 plugins: Iterable[str] | None = None) -> None:
        manager = PluginManager(strict=strict)
        if plugins is not None:
            manager.allow = set(plugins)
        self._manager = manager.load_entrypoints()
        self._registry: Registry | None = None

    # -- plugins ------------------------------------------------------------------------------

    @property
    def manager(self) -> PluginManager:
        return self._manager

    @property
    def registry(self) -> Registry:
        """What the plugins registered, built on first use and after each :meth:`register`."""
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def _build_registry(self) -> Registry:
        registry = Registry.from_manager(self._manager)
        # building again calls every discovery hook again: report a failing hook once
        seen: set[tuple[str, str]] = set()
        failures = []
        for failure in self._manager.failures:
            if (failure.name, failure.error) not in seen:
                seen.add((failure.name, failure.error))
                failures.append(failure)
        self._manager.failures[:] = failures
        return registry

    def register(self, plugin: Any, *, name: str | None = None) -> None:
        """Add a plugin written in code: a module or object carrying ``@inferopt.hookimpl``
        functions. Every later call on this session sees what it registers. A plugin that
        cannot be added (an unknown hook, a name already taken) raises :class:`PluginError`."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self._manager.plugins:
            raise PluginError(f"a plugin named {name!r} is already loaded (from "
                              f"{self._manager.plugins[name].distribution}); pick another name")
        self.registry  # noqa: B018 (build it first: new failures are then this plugin's)
        failed_before = len(self._manager.failures)
        info = self._manager.register(plugin, name=name)  # strict mode raises by itself
        if info is None:
            raise PluginError(f"plugin {name!r} could not be registered: "
                              f"{self._manager.failures.pop().error}")
        try:
            registry = self._build_registry()
        except Exception as exc:  # strict mode: its discovery hook raised or clashed
            error = f"{type(exc).__name__}: {exc}"
        else:
            new = [f for f in self._manager.failures[failed_before:] if f.name == name]
            if not new:
                self._registry = registry
                return
            error = new[0].error
        self._manager.unregister(name)
        self._manager.failures[:] = [f for f in self._manager.failures if f.name != name]
        self._registry = self._build_registry()
        raise PluginError(f"plugin {name!r} could not be registered: {error}")

    def names(self, kind: str) -> list[str]:
        """The names of the installed plugins of one kind: ``"optimizer"``, ``"backend"``,
        ``"metric"``, ``"model source"`` or ``"data source"`` (sources by scheme)."""
        self._check_kind(kind)
        return self.registry.names(kind)

    def describe(self, kind: str, name: str) -> dict[str, Any]:
        """One installed plugin class as plain data: ``name``, ``kind``, ``summary``,
        ``plugin``, ``distribution``, ``version`` and ``options`` (the list ``inferopt plugins
        --json`` shows), plus ``optimizer_version`` for optimizers and ``description``
        (:meth:`inferopt.Metric.describe`) for metrics."""
        self._check_kind(kind)
        entry = self.registry.get(kind, name)
        option_class = entry.option_class
        out = {"name": entry.name, "kind": kind, "summary": entry.summary,
               "plugin": entry.plugin, "distribution": entry.distribution,
               "version": entry.version,
               "options": options.describe(option_class) if option_class is not None else []}
        if kind == "optimizer":
            out["optimizer_version"] = getattr(entry.obj, "version", 1)
        if kind == "metric":
            out["description"] = entry.obj.describe()
        return out

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise UsageError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")

    # -- configs ------------------------------------------------------------------------------

    def optimizer_class(self, name: str) -> type[Optimizer]:
        """The class of the optimizer called ``name``; instantiate it with its options
        (``Int8 = session.optimizer_class("int8"); Int8(mode="static")``)."""
        return self.registry.get("optimizer", name).obj  # type: ignore[no-any-return]

    def optimizer(self, name: str, /, **opts: Any) -> Optimizer:
        """The optimizer ``name`` configured with ``opts`` (typed values or CLI strings),
        checked like ``--optimize`` options: a value for :meth:`apply`."""
        return options.build(self.optimizer_class(name), opts,  # type: ignore[no-any-return]
                             f"optimizer {name!r}")

    def backend(self, name: str, /, **opts: Any) -> Backend:
        """The backend ``name`` configured with ``opts`` (typed values or CLI strings), checked
        like ``--backend`` options: to ask its ``device`` or whether it is ``available()``."""
        return options.build(self.registry.get("backend", name).obj,  # type: ignore[no-any-return]
                             opts, f"backend {name!r}")

    def _configured(self, config: str | Optimizer, opts: Mapping[str, Any]) -> tuple[Any, str]:
        """The optimizer to apply and the plugin it comes from."""
        if isinstance(config, str):
            entry = self.registry.get("optimizer", config)
            return options.build(entry.obj, opts, f"optimizer {config!r}"), entry.plugin
        if not isinstance(config, Optimizer):
            raise UsageError(
                f"apply() takes an optimizer name or an optimizer object, not "
                f"{type(config).__name__}; build one with inferopt.optimizer(NAME, **options)"
            )
        cls = type(config)
        name = getattr(cls, "name", cls.__name__)
        if opts:
            raise UsageError(
                f"optimizer {name!r} is given as an object, so its options are set already; "
                f"pass either the object or the name with options ({', '.join(opts)})"
            )
        plugin = "(not registered)"
        if ("optimizer", name) in self.registry:
            entry = self.registry.get("optimizer", name)
            if entry.obj is cls:
                plugin = entry.plugin
        if not attrs.has(cls):
            return config, plugin
        # built directly, an attrs instance skipped the checks options get from a string:
        # build it again from its values so that choices, ranges and validators apply
        values = {f.name: getattr(config, f.name) for f in attrs.fields(cls) if f.init}
        return options.build(cls, values, f"optimizer {name!r}"), plugin

    # -- the API ------------------------------------------------------------------------------

    def run(
        self,
        recipe: str | Path | None = None,
        *,
        model: str | torch.nn.Module | None = None,
        data: str | Data | Iterable[Any] | None = None,
        optimize: list[str] | None = None,
        backend: str | None = None,
        metrics: list[str] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        out: str | Path | None = None,
        baseline_backend: str | None = None,
        gates: Mapping[str, float] | None = None,
        output: str | None = None,
        split: str | None = None,
        trust_model: bool = False,
        keep_going: bool = False,
        overwrite: bool = False,
        save: bool = True,
        allow_collapse: bool = False,
    ) -> Report:
        """Run the pipeline with this session's plugins; see :func:`inferopt.run`."""
        from inferopt._pipeline import run as run_pipeline
        from inferopt._recipe import make_recipe

        ensure_logging()
        model_spec = model if isinstance(model, str) else None
        data_spec = data if isinstance(data, str) else None
        rec = make_recipe(
            recipe,
            model=model_spec,
            data=data_spec,
            backend=backend,
            baseline_backend=baseline_backend,
            optimize=optimize,
            metrics=metrics,
            batch_size=batch_size,
            seed=seed,
            out=str(out) if out is not None else None,
            gates=gates,
            output=output,
            split=split,
            trust_model=trust_model,
            keep_going=keep_going,
            allow_collapse=allow_collapse,
        )
        return run_pipeline(
            rec,
            model=None if isinstance(model, str) else model,
            data=None if isinstance(data, str) else data,
            manager=self._manager,
            registry=self.registry,
            overwrite=overwrite,
            save=save,
        )

    def load_inputs(
        self,
        recipe: str | Path | None = None,
        *,
        model: str | None = None,
        data: str | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        split: str | None = None,
        trust_model: bool = False,
    ) -> tuple[torch.nn.Module, Data, dict[str, Any]]:
        """The model and data a :meth:`run` with these arguments would measure, loaded once
        through the installed sources and checked as ``run`` checks them (a module, at least
        one batch, a batch size the data can fill), for a caller that runs many recipes on
        them (``run(model=module, data=data, ...)``, as ``inferopt tune`` does).

        Returns ``(model, data, recipe)``: ``data`` is already re-split when ``split`` (or the
        recipe file) asks for it, so pass ``split=None`` to those runs; ``recipe`` is the
        resolved recipe as plain data (``model`` and ``data`` specs, ``backend``, ``metrics``,
        ``batch_size``, ``seed``, ``split``, ``output``, ..., and whether the batch size and
        the metrics were given: ``batch_size_explicit``, ``metrics_explicit``).
        """
        import torch

        from inferopt._contract import SourceContext
        from inferopt._pipeline import as_data, new_run_id, resolve
        from inferopt._recipe import make_recipe

        ensure_logging()
        rec = make_recipe(recipe, model=model, data=data, batch_size=batch_size, seed=seed,
                          split=split, trust_model=trust_model, optimize=[])
        ctx = resolve(rec, self._manager, self.registry, new_run_id())
        assert ctx.model_source is not None and ctx.data_spec is not None
        torch.manual_seed(rec.seed)
        source_ctx = SourceContext(log=ctx.log, batch_size=rec.batch_size, seed=rec.seed,
                                   trust_model=rec.trust_model)
        module = ctx.model_source.obj().load(rec.model, source_ctx)
        if not isinstance(module, torch.nn.Module):
            raise UsageError(f"model {rec.model!r} gave a {type(module).__name__}, not a "
                             "torch.nn.Module; the callable must return the model")
        from inferopt._sources import resolve_model_source

        entry = resolve_model_source(self.registry, ctx.data_spec, kind="data source")
        loaded = as_data(entry.obj().load(ctx.data_spec, source_ctx), rec.batch_size)
        if rec.split is not None and loaded.eval:
            from inferopt._splits import split_data

            loaded = split_data(loaded, rec.split, rec.batch_size)
        if not loaded.eval:
            raise UsageError(f"--data {ctx.data_spec!r} gave no batches; it must yield at least "
                             "one")
        if rec.batch_size_explicit and rec.batch_size > loaded.num_samples:
            raise UsageError(
                f"--batch-size {rec.batch_size} is larger than the data: {ctx.data_spec!r} has "
                f"{loaded.num_samples} samples to measure on; give --batch-size "
                f"{loaded.num_samples} or less (or more data)")
        resolved = {**rec.to_dict(), "data": ctx.data_spec,
                    "batch_size_explicit": rec.batch_size_explicit,
                    "metrics_explicit": rec.metrics_explicit}
        return module, loaded, resolved

    def apply(
        self,
        model: torch.nn.Module,
        config: str | Optimizer,
        *,
        data: Data | Iterable[Any] | None = None,
        batch_size: int = 64,
        seed: int = 0,
        **opts: Any,
    ) -> torch.nn.Module:
        """Apply one optimizer, by name with options or as a configured object; see
        :func:`inferopt.apply`."""
        from inferopt._pipeline import as_data
        from inferopt._sources import model_loader

        ensure_logging()
        optimizer, plugin = self._configured(config, opts)
        name = getattr(optimizer, "name", type(optimizer).__name__)
        ctx = StepContext(
            log=get_logger(optimizer=name, plugin=plugin),
            data=as_data(data, batch_size) if data is not None else None,
            seed=seed,
            model_loader=model_loader(self.registry, get_logger(optimizer=name), seed,
                                      trust_model=False),
        )
        return optimizer.apply(model, ctx)  # type: ignore[no-any-return]

    def load(
        self, path: str | Path, model: torch.nn.Module | None = None, *,
        trust_model: bool = False
    ) -> torch.nn.Module:
        """Rebuild a saved run with this session's plugins; see :func:`inferopt.load`."""
        from inferopt._artifacts import load

        return load(path, model=model, trust_model=trust_model, registry=self.registry)


def ensure_logging() -> None:
    """Library use: logs go to stderr like the CLI's unless the application set up structlog."""
    import structlog

    from inferopt._logging import configure

    if not structlog.is_configured():
        configure()


_default: tuple[tuple[Any, ...], Session] | None = None


def default_session() -> Session:
    """The Session behind ``inferopt.run/apply/load``: made on first use and kept while the
    installed plugins and the plugin environment variables stay the same (a changed
    ``INFEROPT_PLUGINS`` or a newly installed plugin gets a fresh one)."""
    global _default
    key = (
        tuple(os.environ.get(var) for var in (ENV_ALLOW, ENV_BLOCK, ENV_STRICT)),
        tuple(sorted(f"{ep.name}={ep.value}" for ep in _entry_points())),
    )
    if _default is None or _default[0] != key:
        _default = (key, Session())
    return _default[1]
