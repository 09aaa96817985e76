"""The Python API: :func:`run`, :func:`apply`, :func:`load`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferopt._artifacts import load as _load
from inferopt._contract import Data, StepContext
from inferopt._logging import get_logger
from inferopt._pipeline import as_data
from inferopt._recipe import make_recipe
from inferopt._registry import load_plugins
from inferopt._report import Report
from inferopt._sources import model_loader

from . import _options as options

if TYPE_CHECKING:
    import torch


def run(
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
    gates: Mapping[str, float] | None = None,
    output: str | None = None,
    split: str | None = None,
    trust_model: bool = False,
    keep_going: bool = False,
    allow_collapse: bool = False,
    overwrite: bool = False,
    save: bool = True,
) -> Report:
    """Run the pipeline and return the :class:`~inferopt._report.Report`.

    ``recipe`` is an optional TOML file; keyword arguments override it like CLI flags do.
    ``model`` and ``data`` are specs (``"demo:digits-mlp"``) or objects (an ``nn.Module``; a
    :class:`Data`, a Dataset or an iterable of batches). A module passed in is not modified.
    ``output`` picks the output tensor metrics compare (``"last_hidden_state"``); ``split``
    re-splits the data (``"eval=512,calibration=256,seed=0"``); ``trust_model=True`` allows
    unpickling a model file (only for files you trust); ``keep_going=True`` records a failed
    step in the report, undoes it and runs the rest (check ``report.failed_steps``);
    ``allow_collapse=True`` lets a step whose outputs collapse (cosine < 0.9 against the
    baseline) go on with a warning.
    """
    _ensure_logging()
    model_spec = model if isinstance(model, str) else None
    data_spec = data if isinstance(data, str) else None
    rec = make_recipe(
        recipe,
        model=model_spec,
        data=data_spec,
        backend=backend,
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
    from inferopt._pipeline import run as run_pipeline

    return run_pipeline(
        rec,
        model=None if isinstance(model, str) else model,
        data=None if isinstance(data, str) else data,
        overwrite=overwrite,
        save=save,
    )


def apply(
    model: torch.nn.Module,
    name: str,
    *,
    data: Data | Iterable[Any] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    **opts: Any,
) -> torch.nn.Module:
    """Apply one optimizer to ``model`` and return the result (the torchao ``quantize_`` feel).

    ``opts`` are the optimizer's options as typed values (``mode="static"``) or strings.
    ``data`` is needed by optimizers that calibrate or train. The module may be changed in
    place; pass a copy to keep the original.
    """
    _ensure_logging()
    _manager, registry = load_plugins()
    entry = registry.get("optimizer", name)
    optimizer = options.build(entry.obj, opts, f"optimizer {name!r}")
    ctx = StepContext(
        log=get_logger(optimizer=name, plugin=entry.plugin),
        data=as_data(data, batch_size) if data is not None else None,
        seed=seed,
        model_loader=model_loader(registry, get_logger(optimizer=name), seed, trust_model=False),
    )
    return optimizer.apply(model, ctx)


def _ensure_logging() -> None:
    """Library use: logs go to stderr like the CLI's unless the application set up structlog."""
    import structlog

    from inferopt._logging import configure

    if not structlog.is_configured():
        configure()


def load(
    path: str | Path, model: torch.nn.Module | None = None, *, trust_model: bool = False
) -> torch.nn.Module:
    """Rebuild a model saved by ``inferopt run``. Nothing is unpickled unless ``trust_model`` is
    True (needed only when the run started from a pickled model file)."""
    return _load(path, model=model, trust_model=trust_model)
