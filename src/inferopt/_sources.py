"""From a spec to the model or data source that reads it, and the trust rule for specs that
come from a saved run rather than from the user."""

from __future__ import annotations

from typing import Any

from inferopt._contract import SourceContext
from inferopt._errors import UsageError
from inferopt._registry import Entry, Registry


def resolve_model_source(registry: Registry, spec: str, kind: str = "model source") -> Entry:
    """The source for a spec: by its ``scheme:`` prefix, or by a source that claims it."""
    scheme, sep, _rest = spec.partition(":")
    if sep and (kind, scheme) in registry:
        return registry.get(kind, scheme)
    for entry in registry.entries(kind):
        if entry.obj().claims(spec):
            return entry
    known = ", ".join(f"{n}:..." for n in registry.names(kind))
    flag = "--model" if kind == "model source" else "--data"
    raise UsageError(
        f"{flag} {spec!r}: no installed {kind} reads it. Known schemes: {known}; "
        "a Python file is written PATH.py:CALLABLE"
    )


TRUST_HINT = ("pass trust_model=True (inferopt.load) or --trust-model if you trust the run "
              "directory; a saved run never grants trust by itself, even one you wrote "
              "yourself")


def resolve_saved_model_source(registry: Registry, spec: str, where: str, *,
                               trust_model: bool) -> Entry:
    """The source for a model spec read from a saved run (``inferopt.json``), which may have
    been tampered with: a source that runs code to load a model (``python:``, ``PATH.py:``,
    pickled files, any source that does not declare itself data-only) is refused unless the
    user said they trust it. ``where`` names the file and the field, for the message."""
    entry = resolve_model_source(registry, spec)
    if trust_model or not getattr(entry.obj, "runs_code", True):
        return entry
    raise UsageError(
        f"{where}: {spec!r} is loaded by the model source {entry.name!r} (plugin "
        f"{entry.plugin!r}), which runs code to build the model (imports, calls or unpickles "
        f"what the spec names); refused, because a saved run can be edited by anyone who "
        f"can write to it: {TRUST_HINT}"
    )


def model_loader(registry: Registry, log: Any, seed: int, trust_model: bool,
                 saved_run: str | None = None) -> Any:
    """A ``StepContext.model_loader``: specs resolved by ``registry``'s model sources. With
    ``saved_run`` (the manifest a spec was read from) the spec is untrusted input: sources that
    run code need ``trust_model`` (:func:`resolve_saved_model_source`)."""

    def load(spec: str, what: str = "a model spec") -> Any:
        if saved_run is not None:
            label = f"{saved_run}: {what}" if saved_run else what
            entry = resolve_saved_model_source(registry, spec, label, trust_model=trust_model)
        else:
            entry = resolve_model_source(registry, spec)
        sctx = SourceContext(log=log, seed=seed, restoring=True, trust_model=trust_model)
        return entry.obj().load(spec, sctx)

    return load
