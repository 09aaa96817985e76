"""The plugin manager: finds plugins through the ``inferopt`` entry-point group and loads each
on its own, so that one broken plugin is reported while the rest keep working.

Built-in plugins are found the same way as third-party ones: the ``inferopt`` distribution
declares its own entry points.

Environment variables:

* ``INFEROPT_PLUGINS``: comma-separated allow-list of plugin (entry point) names; when set,
  only these are loaded.
* ``INFEROPT_BLOCK_PLUGINS``: comma-separated names never to load.
* ``INFEROPT_STRICT_PLUGINS=1``: a plugin that fails to load is an error instead of a warning.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import pluggy

from inferopt._errors import PluginError

from . import _hookspecs as hookspecs

ENTRY_POINT_GROUP = "inferopt"
_MARKERS = ("tryfirst", "trylast", "hookwrapper", "wrapper")
ENV_ALLOW = "INFEROPT_PLUGINS"
ENV_BLOCK = "INFEROPT_BLOCK_PLUGINS"
ENV_STRICT = "INFEROPT_STRICT_PLUGINS"


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its name (the entry point's), module and the distribution providing it."""

    name: str
    module: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


@attrs.frozen
class PluginFailure:
    """A plugin that could not be loaded or whose hook raised; shown by ``inferopt plugins``."""

    name: str
    distribution: str
    version: str
    error: str
    detail: str = ""


def _split_env(value: str | None) -> set[str] | None:
    if value is None or not value.strip():
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


class PluginManager:
    """A fresh pluggy manager per run; nothing is loaded at import time.

    ``strict`` (or ``INFEROPT_STRICT_PLUGINS=1``) turns a failing plugin into a
    :class:`PluginError`; otherwise it is recorded in :attr:`failures` and skipped.
    """

    def __init__(
        self,
        *,
        strict: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.strict = _truthy(env.get(ENV_STRICT)) if strict is None else strict
        self.allow = _split_env(env.get(ENV_ALLOW))
        self.block = _split_env(env.get(ENV_BLOCK)) or set()
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self.skipped: list[str] = []

    # -- loading ------------------------------------------------------------------------------

    def load_entrypoints(self) -> PluginManager:
        """Load every plugin of the ``inferopt`` entry-point group, each on its own."""
        seen: set[str] = set()
        # inferopt's own plugins first: a third-party entry point reusing a built-in's name is
        # the one reported as failed, never the built-in
        provenance: dict[str, tuple[str, str]] = {}  # each METADATA file read once

        def dist_of(ep: Any) -> tuple[str, str]:
            dist = getattr(ep, "dist", None)
            if dist is None:
                return "?", "?"
            where = str(getattr(dist, "_path", id(dist)))
            if where not in provenance:
                provenance[where] = (dist.metadata["Name"], dist.version)
            return provenance[where]

        ordered = sorted(_entry_points(), key=lambda e: dist_of(e)[0] != "inferopt")
        for ep in ordered:
            dist_name, version = dist_of(ep)
            key = f"{ep.name}\0{ep.value}"
            if key in seen:  # the same distribution seen twice on sys.path
                continue
            seen.add(key)
            if (self.allow is not None and ep.name not in self.allow) or ep.name in self.block:
                self.skipped.append(ep.name)
                continue
            if ep.name in self.plugins:
                other = self.plugins[ep.name]
                self._fail(
                    ep.name,
                    dist_name,
                    version,
                    f"plugin name {ep.name!r} is already taken by {other.module} from "
                    f"{other.distribution}; rename one of the entry points",
                )
                continue
            try:
                module = ep.load()
            # any exception while importing a plugin is that plugin's fault, not the run's
            except Exception as exc:
                self._fail(ep.name, dist_name, version, _describe(exc), traceback.format_exc())
                continue
            self.register(module, name=ep.name, distribution=dist_name, version=version)
        return self

    def register(
        self,
        plugin: Any,
        *,
        name: str,
        distribution: str = "(registered in code)",
        version: str = "",
    ) -> PluginInfo | None:
        """Register one plugin object (usually a module carrying ``@hookimpl`` functions).

        Checks that every hook it implements exists (a misspelled hook is a failure naming the
        plugin) and that the signatures match the specs.
        """
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            self._fail(name, distribution, version, _describe(exc))
            return None
        unknown = [
            caller.name
            for caller in self._pm.get_hookcallers(plugin) or []
            if caller.spec is None
        ]
        if unknown:
            self._pm.unregister(plugin)
            self._fail(
                name,
                distribution,
                version,
                f"implements unknown hook(s) {', '.join(sorted(unknown))}; known hooks: "
                f"{', '.join(sorted(hook_names()))}",
            )
            return None
        # implementations are called one by one in registration order (see call_each), so
        # pluggy's ordering and wrapping markers would not mean what they say: refuse them
        marked = sorted(
            f"{caller.name} ({', '.join(m for m in _MARKERS if getattr(impl, m, False))})"
            for caller in self._pm.get_hookcallers(plugin) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin and any(getattr(impl, m, False) for m in _MARKERS)
        )
        if marked:
            self._pm.unregister(plugin)
            self._fail(
                name,
                distribution,
                version,
                f"uses hookimpl markers inferopt does not support: {', '.join(marked)}; "
                "inferopt calls every implementation once, in plugin order, so drop "
                "tryfirst/trylast/wrapper/hookwrapper",
            )
            return None
        hooks = tuple(sorted(c.name for c in self._pm.get_hookcallers(plugin) or []))
        module = getattr(plugin, "__name__", type(plugin).__name__)
        info = PluginInfo(name, module, distribution, version, hooks)
        self.plugins[name] = info
        return info

    def unregister(self, name: str) -> None:
        """Remove the plugin registered as ``name`` (a plugin added in code that failed)."""
        plugin = self._pm.get_plugin(name)
        if plugin is not None:
            self._pm.unregister(plugin)
        self.plugins.pop(name, None)

    def _fail(
        self, name: str, distribution: str, version: str, error: str, detail: str = ""
    ) -> None:
        failure = PluginFailure(name, distribution, version, error, detail)
        if self.strict:
            raise PluginError(f"plugin {name!r} from {distribution} failed: {error}")
        self.failures.append(failure)

    # -- calling ------------------------------------------------------------------------------

    def call_each(
        self,
        hook_name: str,
        kwargs_for: Callable[[str], dict[str, Any]],
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        """Call every implementation of ``hook_name`` separately.

        pluggy stops a hook call at the first exception; calling implementations one by one
        keeps a broken plugin from taking the others down. ``kwargs_for(plugin_name)`` builds
        the arguments (so that, for example, ``register`` knows who is registering).
        """
        caller = getattr(self._pm.hook, hook_name)
        # registration order: inferopt's own plugins first, then third parties; ordering
        # markers are refused at registration, so no implementation expects pluggy's LIFO order
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name
            kwargs = kwargs_for(plugin_name)
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:
                if self.strict or on_error is None:
                    raise
                on_error(plugin_name, exc)

    def notify(
        self, hook_name: str, on_error: Callable[[str, BaseException], None], **kwargs: Any
    ) -> None:
        """Call a lifecycle hook on every observer, each on its own (see :meth:`call_each`)."""
        self.call_each(hook_name, lambda _plugin: kwargs, on_error)

    def record_hook_failure(self, plugin_name: str, exc: BaseException) -> None:
        """Record that a plugin's hook raised; strict mode raises instead."""
        info = self.plugins.get(plugin_name)
        self._fail(
            plugin_name,
            info.distribution if info else "?",
            info.version if info else "?",
            _describe(exc),
            "".join(traceback.format_exception(exc)),
        )

    def plugin_of(self, name: str) -> PluginInfo | None:
        return self.plugins.get(name)


def hook_names() -> list[str]:
    """Names of every hook in the spec, for error messages and documentation."""
    return [n for n in dir(hookspecs) if n.startswith("inferopt_")]


def _entry_points() -> Iterable[importlib_metadata.EntryPoint]:
    return importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
