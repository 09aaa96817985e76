"""Models and data from the user's own Python code.

``python:MODULE:CALLABLE`` imports ``MODULE`` (as ``import`` would) and calls ``CALLABLE()``;
``PATH.py:CALLABLE`` does the same with a file (its folder is put on ``sys.path`` while it is
imported, so it can import its neighbours). For a model the callable returns an ``nn.Module``;
for data it returns a tensor, ``(inputs, labels)``, a ``torch.utils.data.Dataset``, an iterable of
batches, or an :class:`inferopt.Data`.

Keyword arguments follow a third colon: ``python:my_models:build:width=256,act=gelu`` calls
``build(width=256, act="gelu")`` (values are Python literals where they parse, else strings).
For a model, ``weights=PATH`` is not passed on: it names a state dict (``.safetensors``, or a
``.pt``/``.pth`` read with ``torch.load(weights_only=True)``, which unpickles nothing but
tensors) loaded into the module the callable built: the usual "architecture in code, weights
in a file" checkpoint.

This runs the user's code, which is what they asked for by naming it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from inferopt import Data, DataSource, ModelSource, UsageError, hookimpl
from inferopt.plugins.sources.torch_file import refusal_reason

_ARGS = r"(?::(?P<args>[A-Za-z_]\w*=.*))?"
_FILE_SPEC = re.compile(r"^(?P<path>.+?\.py):(?P<attr>[A-Za-z_][\w.]*)" + _ARGS + "$")
_MODULE_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)" + _ARGS + "$")
_WEIGHTS = "weights"


def _flag(kind: str) -> str:
    return "--model" if kind == "model" else "--data"


def _body(spec: str) -> str:
    return spec[len("python:") :] if spec.startswith("python:") else spec


def parse_args(spec: str, kind: str) -> dict[str, Any]:
    """The ``key=value`` arguments after the callable, as Python values."""
    body = _body(spec)
    match = _FILE_SPEC.match(body) or _MODULE_SPEC.match(body)
    if not match or not match["args"]:
        return {}
    args: dict[str, Any] = {}
    for part in match["args"].split(","):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise UsageError(
                f"{_flag(kind)} {spec!r}: {part!r} is not key=value; write "
                "python:MODULE:CALLABLE:key=value,key2=value2"
            )
        raw = raw.strip()
        try:
            args[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            args[key] = raw  # a bare word or a path: a string
    return args


def portable(spec: str) -> str:
    """``spec`` with the ``PATH.py`` and ``weights=PATH`` made absolute, so that
    ``inferopt.load`` works from any working directory."""
    prefix = "python:" if spec.startswith("python:") else ""
    body = _body(spec)
    match = _FILE_SPEC.match(body) or _MODULE_SPEC.match(body)
    if not match:
        return spec
    head = body[: match.start("args") - 1] if match["args"] else body
    file_match = _FILE_SPEC.match(body)
    if file_match and Path(file_match["path"]).is_file():
        head = f"{Path(file_match['path']).resolve()}:{file_match['attr']}"
    if not match["args"]:
        return prefix + head
    parts = []
    for part in match["args"].split(","):
        key, _eq, value = part.partition("=")
        if key.strip() == _WEIGHTS and Path(value.strip()).is_file():
            part = f"{_WEIGHTS}={Path(value.strip()).resolve()}"
        parts.append(part)
    return f"{prefix}{head}:{','.join(parts)}"


def load_callable(spec: str, kind: str) -> Any:
    """Import the object a ``python:MOD:ATTR`` or ``PATH.py:ATTR`` spec names."""
    flag = _flag(kind)
    body = _body(spec)
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
                f"{flag} {spec!r}: write python:MODULE:CALLABLE[:key=value,...] (for example "
                "python:my_pkg.models:build:width=256) or PATH.py:CALLABLE"
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
            where = repr(file_match["path"]) if file_match else module.__name__
            raise UsageError(
                f"{flag} {spec!r}: {where} has no attribute {attr!r}; it has: "
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


def _call(obj: Any, spec: str, kind: str, args: dict[str, Any] | None = None) -> Any:
    if not callable(obj):
        if args:
            raise UsageError(f"{_flag(kind)} {spec!r}: arguments were given but "
                             f"{type(obj).__name__} is not callable")
        return obj
    try:
        return obj(**(args or {}))
    except TypeError as exc:
        raise UsageError(
            f"{_flag(kind)} {spec!r}: calling it with {args or 'no arguments'} raised "
            f"TypeError: {exc}"
        ) from exc
    except Exception as exc:
        raise UsageError(
            f"{_flag(kind)} {spec!r}: calling it raised {type(exc).__name__}: {exc}"
        ) from exc


class PythonModels(ModelSource):
    """``python:MODULE:CALLABLE[:k=v,...]`` or ``PATH.py:CALLABLE[:k=v,...]`` returning an
    ``nn.Module``; ``weights=PATH`` loads a state dict into it."""

    scheme = "python"
    summary = ("your code: python:MODULE:CALLABLE[:k=v,...,weights=STATE_DICT] or "
               "PATH.py:CALLABLE returning an nn.Module")

    def claims(self, spec: str) -> bool:
        return bool(_FILE_SPEC.match(spec))

    def portable_spec(self, spec: str) -> str:
        return portable(spec)

    def load(self, spec: str, ctx: Any) -> Any:
        import torch

        args = parse_args(spec, "model")
        weights = args.pop(_WEIGHTS, None)
        model = _call(load_callable(spec, "model"), spec, "model", args)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                "make the callable return the model"
            )
        # a saved run brings its own weights: a weights file since moved away does not matter
        if weights is not None and not (ctx.restoring and not Path(str(weights)).is_file()):
            load_state_dict_file(model, str(weights), spec)
        return model.eval()


def read_state_dict(path: Path, what: str) -> dict[str, Any]:
    """Tensors from a ``.safetensors`` file, or from a ``.pt``/``.pth``/``.bin`` file read with
    ``torch.load(weights_only=True)`` (a checkpoint dict holding the state dict under
    ``state_dict``/``model_state_dict``/``model`` is unwrapped)."""
    import pickle

    import torch

    if not path.is_file():
        raise UsageError(f"{what}: weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise UsageError(f"{what}: {str(path)!r} is not a readable safetensors file: "
                             f"{exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise UsageError(
            f"{what}: {str(path)!r} holds more than tensors (torch.load with weights_only=True "
            f"refused it: {refusal_reason(exc)[:200]}). Save the state dict alone "
            "(torch.save(model.state_dict(), path)) or as .safetensors"
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{what}: {str(path)!r} does not hold a state dict (name -> tensor); "
                         f"it holds a {type(obj).__name__}")
    return obj


def load_state_dict_file(model: Any, path: str, spec: str) -> None:
    """Load the state dict in ``path`` into ``model``, strictly: every key must match."""
    what = f"--model {spec!r}"
    state = read_state_dict(Path(path).expanduser(), what)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise UsageError(f"{what}: the weights in {path!r} do not fit the model the callable "
                         f"built: {str(exc).strip()[:500]}") from exc
    if missing or unexpected:
        raise UsageError(
            f"{what}: the weights in {path!r} do not match the model the callable built "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}); check the "
            "arguments that choose the architecture"
        )


class PythonData(DataSource):
    """``python:MODULE:CALLABLE`` or ``PATH.py:CALLABLE`` returning batches, a Dataset, tensors
    or :class:`inferopt.Data`."""

    scheme = "python"
    summary = "your code: returns batches, a torch Dataset, (inputs, labels) or inferopt.Data"

    def claims(self, spec: str) -> bool:
        return bool(_FILE_SPEC.match(spec))

    def load(self, spec: str, ctx: Any) -> Data:
        from inferopt.utils import batches_from

        obj = _call(load_callable(spec, "data"), spec, "data", parse_args(spec, "data"))
        if isinstance(obj, Data):
            return obj
        return Data(eval=batches_from(obj, ctx.batch_size, what=f"--data {spec!r}"))


@hookimpl
def inferopt_register_models(register: Any) -> None:
    register(PythonModels)


@hookimpl
def inferopt_register_datasets(register: Any) -> None:
    register(PythonData)
