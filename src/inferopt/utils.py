"""Helpers for plugin authors: the public toolbox next to the base classes in :mod:`inferopt`.

Everything here is stable API; the modules it comes from (``inferopt._*``) are private.
Importing this module does not import torch: each helper loads its module on first use.

Calling models and reading their outputs
    :func:`call_model`, :func:`iter_tensors`, :func:`first_tensor`, :func:`primary_output`,
    :func:`select_output`, :func:`output_names`, :func:`output_signature`, :func:`all_finite`,
    :func:`move_to`
Batches
    :func:`to_batch`, :func:`split_tensors`, :func:`batches_from`
Specs and options (for sources that take ``key=value`` options)
    :func:`parse_spec`, :func:`parse_target_spec`, :func:`build_options`
Rewriting models
    :func:`set_submodule`, :func:`device_of`, :func:`require_swappable`
Observing layers on calibration data
    :class:`InputObserver`, :func:`run_with_input_hooks`, :func:`observe_inputs`
Backends
    :func:`backend_refuses` (whether a backend can run what an optimizer produces, and why not)
Cost of a model
    :func:`count_macs`, :func:`macs_per_sample`, :func:`parameter_count`,
    :func:`weight_sparsity`, :class:`MacCount`, :func:`no_fast_path`,
    :func:`state_dict_for_saving`, :func:`weights_bytes`
Commands (``inferopt_register_commands``)
    :func:`cli_logging_options` (``--log-format/--log-level/--strict-plugins/--debug``),
    :func:`cli_fail` (print an :class:`inferopt.InferoptError` and exit with its code),
    :func:`cli_errors` (a command body's errors as ``run`` reports them: exit 2, 130, ...),
    :func:`cli_input_options` (``RECIPE``, ``--model``, ``--data``, ... as ``run`` has them),
    :func:`parse_accuracy_budget` (``--max-accuracy-drop 1.0`` or ``2%``)
The machine, progress, logs
    :func:`cpu_flags`, :func:`cpu_model`, :func:`progress`, :func:`disable_progress`,
    :func:`get_logger`, :func:`configure_logging`,
    :func:`finite_json`
Reports
    :data:`REPORT_SCHEMA`, :func:`plot_reports`, :func:`plot_available`,
    :func:`report_rows` (each report's quantities as its metrics describe them),
    :func:`print_table`, :func:`markdown_table` (a command's table on the console, in Markdown)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "call_model": "_model_io", "iter_tensors": "_model_io", "first_tensor": "_model_io",
    "primary_output": "_model_io", "select_output": "_model_io", "output_names": "_model_io",
    "output_signature": "_model_io", "all_finite": "_model_io", "move_to": "_model_io",
    "to_batch": "_batching", "split_tensors": "_batching", "batches_from": "_batching",
    "parse_spec": "_recipe", "parse_target_spec": "_recipe", "build_options": "_options",
    "set_submodule": "_model_surgery", "device_of": "_model_surgery",
    "require_swappable": "_model_surgery",
    "InputObserver": "_calibration", "run_with_input_hooks": "_calibration",
    "observe_inputs": "_calibration",
    "backend_refuses": "_prepare",
    "count_macs": "_model_cost", "macs_per_sample": "_model_cost",
    "parameter_count": "_model_cost", "weight_sparsity": "_model_cost",
    "MacCount": "_model_cost", "no_fast_path": "_model_cost",
    "state_dict_for_saving": "_artifacts", "weights_bytes": "_artifacts",
    "cpu_flags": "_hardware", "cpu_model": "_hardware",
    "progress": "_progress", "disable_progress": "_progress",
    "get_logger": "_logging",
    "configure_logging": "_logging",
    "cli_logging_options": "_cli", "cli_fail": "_cli", "parse_accuracy_budget": "_cli",
    "cli_errors": "_cli", "cli_input_options": "_cli",
    "finite_json": "_report", "REPORT_SCHEMA": "_report",
    "plot_reports": "_plotting", "plot_available": "_plotting", "report_rows": "_quantities",
    "print_table": "_tables", "markdown_table": "_tables",
}
_RENAMED = {"build_options": "build", "configure_logging": "configure",
            "cli_logging_options": "logging_options", "cli_fail": "fail",
            "cli_errors": "errors", "cli_input_options": "input_options",
            "parse_accuracy_budget": "accuracy_gate", "REPORT_SCHEMA": "SCHEMA",
            "plot_available": "available", "disable_progress": "set_disabled"}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    pass


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'inferopt.utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"inferopt.{module}"), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
