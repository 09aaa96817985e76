"""Models and data from the user's own Python code.

``python:MODULE:CALLABLE`` imports ``MODULE`` (as ``import`` would) and calls ``CALLABLE()``;
``PATH.py:CALLABLE`` does the same with a file (its folder is put on ``sys.path`` while it is
imported, so it can import its neighbours). For a model the callable returns an ``nn.Module``;
for data it returns a tensor, ``(inputs, labels)``, a ``torch.utils.data.Dataset``, an iterable of
batches, or an :class:`inferopt.Data`.

This runs the user's code, which is what they asked for by naming it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from inferopt import Data, DataSource, ModelSource, UsageError, hookimpl

_FILE_SPEC = re.compile(r"^(?P<path>.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")
_MODULE_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)$")


def _flag(kind: str) -> str:
    return "--model" if kind == "model" else "--data"


def load_callable(spec: str, kind: str) -> Any:
    """Import the object a ``python:MOD:ATTR`` or ``PATH.py:ATTR`` spec names."""
    flag = _flag(kind)
    body = spec[len("python:") :] if spec.startswith("python:") else spec
    file_match = _FILE_SPEC.match(body)
    if file_match:
        path = Path(file_match["path"]).expanduser()
        if not path.is_file():
            raise UsageError(f"{flag} {spec!r}: file {str(path)!r} does not exist")
        module = _import_file(path, spec, flag)
        attr = file_match["attr"]
    else:
        match = _MODULE_SPEC.match(body)
        if not match:
            raise UsageError(
                f"{flag} {spec!r}: write python:MODULE:CALLABLE (for example "
                "python:my_pkg.models:build) or PATH.py:CALLABLE"
            )
        try:
            module = importlib.import_module(match["module"])
        except ImportError as exc:
            raise UsageError(
                f"{flag} {spec!r}: cannot import module {match['module']!r}: {exc}. Is it "
                "installed or on PYTHONPATH?"
            ) from exc
        except Exception as exc:
            raise UsageError(
                f"{flag} {spec!r}: importing {match['module']!r} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        attr = match["attr"]
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise UsageError(
                f"{flag} {spec!r}: {module.__name__} has no attribute {attr!r}; it has: "
                + ", ".join(names[:20])
            )
        obj = getattr(obj, part)
    return obj


def _import_file(path: Path, spec: str, flag: str) -> Any:
    resolved = path.resolve()
    name = "inferopt_user_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"{flag} {spec!r}: cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(resolved.parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UsageError(
            f"{flag} {spec!r}: running {str(path)!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _call(obj: Any, spec: str, kind: str) -> Any:
    if not callable(obj):
        return obj
    try:
        return obj()
    except Exception as exc:
        raise UsageError(
            f"{_flag(kind)} {spec!r}: calling it raised {type(exc).__name__}: {exc}"
        ) from exc


class PythonModels(ModelSource):
    """``python:MODULE:CALLABLE`` or ``PATH.py:CALLABLE`` returning an ``nn.Module``."""

    scheme = "python"
    summary = "your code: python:MODULE:CALLABLE or PATH.py:CALLABLE returning an nn.Module"

    def claims(self, spec: str) -> bool:
        return bool(_FILE_SPEC.match(spec))

    def load(self, spec: str, ctx: Any) -> Any:
        import torch

        model = _call(load_callable(spec, "model"), spec, "model")
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                "make the callable return the model"
            )
        return model.eval()


class PythonData(DataSource):
    """``python:MODULE:CALLABLE`` or ``PATH.py:CALLABLE`` returning batches, a Dataset, tensors
    or :class:`inferopt.Data`."""

    scheme = "python"
    summary = "your code: returns batches, a torch Dataset, (inputs, labels) or inferopt.Data"

    def claims(self, spec: str) -> bool:
        return bool(_FILE_SPEC.match(spec))

    def load(self, spec: str, ctx: Any) -> Data:
        from inferopt.batching import batches_from

        obj = _call(load_callable(spec, "data"), spec, "data")
        if isinstance(obj, Data):
            return obj
        return Data(eval=batches_from(obj, ctx.batch_size, what=f"--data {spec!r}"))


@hookimpl
def inferopt_register_models(register: Any) -> None:
    register(PythonModels)


@hookimpl
def inferopt_register_datasets(register: Any) -> None:
    register(PythonData)
