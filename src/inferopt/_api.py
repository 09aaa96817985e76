"""The Python API: :func:`run`, :func:`apply`, :func:`load`, :func:`optimizer` and
:func:`optimizer_class`, each a call on the default :class:`~inferopt._session.Session`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferopt._contract import Data, Optimizer
from inferopt._session import default_session

if TYPE_CHECKING:
    import torch

    from inferopt._report import Report


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
    baseline_backend: str | None = None,
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
    baseline) go on with a warning. ``baseline_backend`` measures the baseline on another
    backend than ``backend`` (``backend="openvino", baseline_backend="cpu"``: the optimized
    model where it will run against the model as it runs today).
    """
    return default_session().run(
        recipe, model=model, data=data, optimize=optimize, backend=backend, metrics=metrics,
        batch_size=batch_size, seed=seed, out=out, gates=gates, output=output, split=split,
        trust_model=trust_model, keep_going=keep_going, overwrite=overwrite, save=save,
        allow_collapse=allow_collapse, baseline_backend=baseline_backend,
    )


def apply(
    model: torch.nn.Module,
    config: str | Optimizer,
    *,
    data: Data | Iterable[Any] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    **opts: Any,
) -> torch.nn.Module:
    """Apply one optimizer to ``model`` and return the result (the torchao ``quantize_`` feel).

    ``config`` is an optimizer's name, with its options as keyword arguments (typed values
    like ``mode="static"`` or strings), or an optimizer object that carries its options
    (``inferopt.optimizer("int8", mode="static")``). ``data`` is needed by optimizers that
    calibrate or train. The module may be changed in place; pass a copy to keep the original.
    """
    return default_session().apply(model, config, data=data, batch_size=batch_size, seed=seed,
                                   **opts)


def optimizer(name: str, /, **opts: Any) -> Optimizer:
    """The installed optimizer ``name`` configured with ``opts``, checked like ``--optimize``
    options: a value to pass to :func:`apply`, keep, compare or print."""
    return default_session().optimizer(name, **opts)


def optimizer_class(name: str) -> type[Optimizer]:
    """The class of the installed optimizer ``name``; instantiating it gives a config for
    :func:`apply` (``Int8 = inferopt.optimizer_class("int8"); Int8(mode="static")``)."""
    return default_session().optimizer_class(name)


def load(
    path: str | Path, model: torch.nn.Module | None = None, *, trust_model: bool = False
) -> torch.nn.Module:
    """Rebuild a model saved by ``inferopt run``. Nothing is unpickled unless ``trust_model`` is
    True (needed only when the run started from a pickled model file)."""
    return default_session().load(path, model=model, trust_model=trust_model)
