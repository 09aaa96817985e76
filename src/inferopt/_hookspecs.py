"""The hook specifications: every hook a plugin can implement, in one place.

Two kinds of hooks:

* **Discovery hooks** (``inferopt_register_*``) receive a ``register`` callback owned by the
  core. An implementation calls ``register(SomeClass)`` once per class it provides and returns
  nothing. They must be cheap and must not import torch: they run for ``inferopt plugins`` and
  ``inferopt --help``.
* **Lifecycle hooks** (``inferopt_run_start``, ``inferopt_step_end``, ``inferopt_run_end``)
  let observers follow a run. Their return values are ignored; an observer that raises is
  recorded as a warning in the report and the run goes on.

As in pluggy generally, an implementation may accept a subset of the arguments, so new
arguments can be added to a spec without breaking existing plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

PROJECT = "inferopt"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

if TYPE_CHECKING:
    from inferopt._contract import RunInfo
    from inferopt._report import Report, StepRecord

Register = Callable[[type], Any]


# --- discovery -------------------------------------------------------------------------------


@hookspec
def inferopt_register_optimizers(register: Register) -> None:
    """Register optimizer classes (subclasses of :class:`inferopt.Optimizer`).

    Called once per plugin manager when the registry is built. ``register(cls)`` takes an
    attrs class whose ``name`` class attribute is the name users type after ``--optimize``.
    """


@hookspec
def inferopt_register_backends(register: Register) -> None:
    """Register backend classes (subclasses of :class:`inferopt.Backend`).

    ``register(cls)`` takes a class whose ``name`` is what users type after ``--backend``.
    """


@hookspec
def inferopt_register_metrics(register: Register) -> None:
    """Register metric classes (subclasses of :class:`inferopt.Metric`).

    ``register(cls)`` takes a class whose ``name`` is what users type after ``--metric``.
    """


@hookspec
def inferopt_register_models(register: Register) -> None:
    """Register model sources (subclasses of :class:`inferopt.ModelSource`).

    A source's ``scheme`` is the prefix of the specs it reads (``demo`` in ``demo:digits-mlp``);
    a source may also claim specs without a scheme (for example ``path/to/file.py:build``) by
    overriding ``claims``.
    """


@hookspec
def inferopt_register_datasets(register: Register) -> None:
    """Register data sources (subclasses of :class:`inferopt.DataSource`), like model sources."""


@hookspec
def inferopt_register_commands(cli: Any) -> None:
    """Add commands to the ``inferopt`` CLI.

    ``cli`` offers click's ``cli.command(...)`` and ``cli.group(...)`` decorators and
    ``cli.add_command(command)``; a name that is already taken is refused (the plugin's
    commands are dropped and the failure is shown by ``inferopt plugins``). Called when the CLI
    looks up a command, so it must not import torch: import it inside the command's function.
    ``tune``, ``compare`` and ``new-plugin`` are built-in plugins of this kind; helpers for
    commands are in :mod:`inferopt.utils` (``cli_logging_options``, ``cli_fail``).
    """


# --- run lifecycle ---------------------------------------------------------------------------


@hookspec
def inferopt_run_start(run: RunInfo) -> None:
    """Called once the recipe is resolved and the model and data are loaded, before measuring."""


@hookspec
def inferopt_step_end(run: RunInfo, step: StepRecord) -> None:
    """Called after each optimizer step has been applied and checked."""


@hookspec
def inferopt_run_end(run: RunInfo, report: Report) -> None:
    """Called with the finished report, after the results were saved."""
