"""Errors meant for people: each says what went wrong, with which input, and what to do instead.

The CLI maps them to exit codes: :class:`UsageError` (bad usage or input) exits 2,
:class:`GateFailed` (a threshold the user set was not met) exits 1.
"""

from __future__ import annotations


class InferoptError(Exception):
    """Base class of every error inferopt raises on purpose."""

    exit_code = 2


class UsageError(InferoptError):
    """Bad usage or input: an unknown name, a bad option, a file that is not there."""

    exit_code = 2


class PluginError(InferoptError):
    """A plugin failed to load or misbehaved (raised only in strict mode or for a chosen plugin)."""

    exit_code = 2


class StepFailed(InferoptError):
    """An optimizer step broke the model (non-finite outputs, changed shapes) or raised."""

    exit_code = 2


class GateFailed(InferoptError):
    """The run finished but a gate the user set (for example max accuracy drop) failed."""

    exit_code = 1


class BudgetExceeded(InferoptError):
    """A step took the model's accuracy past the budget the user set; the run stopped there."""

    exit_code = 1


class Interrupted(InferoptError):
    """The user interrupted the run (Ctrl-C); the message says what was kept."""

    exit_code = 130
