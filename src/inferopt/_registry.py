"""What the discovery hooks registered, by kind and name.

Each entry remembers the plugin and distribution that registered it, so a duplicate name is an
error naming both plugins and ``inferopt plugins`` can say who provides what.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import attrs

from inferopt._errors import UsageError
from inferopt._manager import PluginManager

#: kind -> (hook that registers it, attribute holding the name, CLI flag that picks it)
KINDS: dict[str, tuple[str, str, str]] = {
    "optimizer": ("inferopt_register_optimizers", "name", "--optimize"),
    "backend": ("inferopt_register_backends", "name", "--backend"),
    "metric": ("inferopt_register_metrics", "name", "--metric"),
    "model source": ("inferopt_register_models", "scheme", "--model"),
    "data source": ("inferopt_register_datasets", "scheme", "--data"),
}


@attrs.frozen
class Entry:
    """One registered class with its provenance."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str
    version: str

    @property
    def summary(self) -> str:
        doc = (self.obj.__doc__ or "").strip().split("\n")[0]
        return str(getattr(self.obj, "summary", "") or doc)

    @property
    def option_class(self) -> Any:
        """The attrs class whose fields are this entry's options: the class itself for
        optimizers, backends and metrics; a source's ``spec_options`` (None: no options)."""
        if self.kind in ("model source", "data source"):
            return getattr(self.obj, "spec_options", None)
        return self.obj


class Registry:
    """Registered optimizers, backends, metrics and model/data sources."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    @classmethod
    def from_manager(cls, manager: PluginManager) -> Registry:
        """Build a registry by calling every discovery hook of every loaded plugin.

        A plugin whose hook raises, or which registers something invalid, is recorded as failed
        in ``manager.failures`` (or raises in strict mode); the rest are kept.
        """
        registry = cls()
        for kind, (hook, _attr, _flag) in KINDS.items():

            def kwargs_for(plugin_name: str, kind: str = kind) -> dict[str, Any]:
                info = manager.plugin_of(plugin_name)

                def register(obj: Any) -> Any:
                    registry.add(
                        kind,
                        obj,
                        plugin=plugin_name,
                        distribution=info.distribution if info else "(registered in code)",
                        version=info.version if info else "",
                    )
                    return obj

                return {"register": register}

            manager.call_each(hook, kwargs_for, on_error=manager.record_hook_failure)
        return registry

    def add(
        self, kind: str, obj: Any, *, plugin: str, distribution: str = "", version: str = ""
    ) -> Entry:
        attr = KINDS[kind][1]
        name = getattr(obj, attr, None)
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"plugin {plugin!r} registered {obj!r} as a {kind} without a string "
                f"{attr!r} attribute; give the class `{attr} = \"...\"`"
            )
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise UsageError(
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} "
                f"({existing.distribution}) and by plugin {plugin!r} ({distribution}); "
                f"uninstall one, or block one with INFEROPT_BLOCK_PLUGINS={plugin}"
            )
        entry = Entry(kind, name, obj, plugin, distribution, version)
        self._entries[kind][name] = entry
        return entry

    def get(self, kind: str, name: str) -> Entry:
        """The entry called ``name``; an unknown name lists the known ones and the closest."""
        entries = self._entries[kind]
        if name in entries:
            return entries[name]
        known = sorted(entries)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(known) if known else "(none installed)"
        raise UsageError(f"unknown {kind} {name!r}. Available: {listing}.{hint}")

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        kinds = [kind] if kind else list(KINDS)
        for k in kinds:
            yield from (self._entries[k][n] for n in sorted(self._entries[k]))

    def __contains__(self, item: tuple[str, str]) -> bool:
        kind, name = item
        return name in self._entries[kind]


def load_plugins(manager: PluginManager | None = None) -> tuple[PluginManager, Registry]:
    """A fresh plugin manager with every entry point loaded (unless one is given), and the
    registry its discovery hooks build."""
    manager = manager or PluginManager().load_entrypoints()
    return manager, Registry.from_manager(manager)
