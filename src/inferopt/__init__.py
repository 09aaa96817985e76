"""inferopt: make trained PyTorch models cheaper to run.

The public API (importing this package does not import torch)::

    import inferopt
    report = inferopt.run(model="demo:digits-mlp", optimize=["int8"])
    fast = inferopt.apply(my_module, "int8", data=batches, mode="dynamic")
    fast = inferopt.apply(my_module, inferopt.optimizer("int8", mode="dynamic"))
    model = inferopt.load("inferopt-runs/<run-id>")

These are calls on a default :class:`Session`; a Session of your own also sees plugins
registered in code (``session.register(my_plugin_module, name="mine")``).

Plugin authors use :data:`hookimpl` and the base classes :class:`Optimizer`, :class:`Backend`,
:class:`Metric`, :class:`ModelSource`, :class:`DataSource`, with :func:`option` for options,
and the helpers in :mod:`inferopt.utils`; test suites use the fixtures of :mod:`inferopt.testing`.
This module, ``inferopt.utils`` and ``inferopt.testing`` are the public API: every other module
(``inferopt._*``) is private and may change in any release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from inferopt._contract import (
    Backend,
    Batch,
    Data,
    DataSource,
    Gate,
    Metric,
    MetricContext,
    ModelSource,
    Optimizer,
    PrepareContext,
    Quantity,
    RunInfo,
    SourceContext,
    StepContext,
)
from inferopt._errors import (
    BudgetExceeded,
    GateFailed,
    InferoptError,
    Interrupted,
    PluginError,
    StepFailed,
    UsageError,
)
from inferopt._hookspecs import hookimpl
from inferopt._options import option
from inferopt._report import Report, StepRecord

if TYPE_CHECKING:
    from inferopt._api import apply, load, optimizer, optimizer_class, run
    from inferopt._session import Session

__all__ = [
    "Backend",
    "Batch",
    "BudgetExceeded",
    "Data",
    "DataSource",
    "Gate",
    "GateFailed",
    "InferoptError",
    "Interrupted",
    "Metric",
    "MetricContext",
    "ModelSource",
    "Optimizer",
    "PluginError",
    "PrepareContext",
    "Quantity",
    "Report",
    "RunInfo",
    "Session",
    "SourceContext",
    "StepContext",
    "StepFailed",
    "StepRecord",
    "UsageError",
    "__version__",
    "apply",
    "hookimpl",
    "load",
    "optimizer",
    "optimizer_class",
    "option",
    "run",
]


def __getattr__(name: str) -> Any:
    # The API functions pull in torch when called; the plugin manager behind them is imported
    # on first use only.
    if name in ("run", "apply", "load", "optimizer", "optimizer_class"):
        from . import _api as api

        return getattr(api, name)
    if name == "Session":
        from ._session import Session

        return Session
    raise AttributeError(f"module 'inferopt' has no attribute {name!r}")
