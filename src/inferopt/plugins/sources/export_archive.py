"""Reading a ``.pt2`` archive that the user has not said they trust, without running its code.

``torch.export.load`` runs code from the file in several ways: it unpickles weights marked
``use_pickle``, custom and opaque objects, legacy ``.pt`` payloads and sample inputs that need
more than tensors (falling back to ``weights_only=False``); for an archive its new loader
rejects, it falls back to the torch <= 2.7 loader, which unpickles; it loads AOTInductor
shared libraries; and it hands every symbolic-shape expression in the graph to
``sympy.sympify``, which evaluates Python. A graph node may also name any attribute of the
``torch`` module as its target, which runs when the model is called.

So an untrusted archive is read in two layers:

1. :func:`refusals` checks the whole archive against what ``torch.export.save`` writes for a
   plain program: an allow-list of entries (anything else is refused), payload configs without
   pickled or custom objects, sample inputs that load with ``weights_only=True``, graph nodes
   whose targets are registered operators (``torch.ops``), ``operator`` or ``math`` functions,
   and shape expressions made only of numbers, symbols and the sympy functions torch prints.
2. :func:`load_untrusted` then calls torch's new-layout loader only (never the legacy
   fallback) on the same bytes that were checked, with every unpickler replaced by one that
   refuses and ``torch.load`` forced to ``weights_only=True``: if the checks missed a path to
   an unpickler, the load fails instead of running it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from typing import Any

# entries of a plain torch.export archive, relative to its root folder
_ALLOWED = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version",
    r"\.data/serialization_id", r"models/[\w.-]+\.json",
    r"data/weights/[\w.-]+_weights_config\.json", r"data/weights/weight_\d+",
    r"data/constants/[\w.-]+_constants_config\.json", r"data/constants/tensor_\d+",
    r"data/sample_inputs/[\w.-]+\.pt", r"extra/[^/]+",
)]
_PAYLOAD_NAME = re.compile(r"(weight|tensor)_\d+")

# names a printed sympy expression of torch's may use; no attribute access, no subscripts
_SYMPY_NAMES = frozenset({
    # torch.utils._sympy.functions, as the deserializer knows them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    # sympy
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt",
    "Ge", "And", "Or", "Not", "Piecewise", "floor", "ceiling", "sqrt", "Pow", "Mul", "Add",
    "oo", "zoo", "nan", "True", "False", "S",
    # Symbol(...) assumptions
    "integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite", "zero",
    "commutative", "precision",
})
_SYMBOL = re.compile(r"[a-z]+\d+")
_TOKEN = re.compile(
    r"\s+|(?P<name>[A-Za-z_]\w*)|(?P<number>\d+(\.\d+)?(e[-+]?\d+)?)|(?P<string>'[^'\\]*')"
    r"|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>=&|~^])"
)
_OPERATOR_FUNCTIONS = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
    "rshift", "matmul", "truth",
})
_TORCH_SYM_FUNCTIONS = frozenset({
    "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "sym_sqrt",
    "_sym_sqrt", "sym_fresh_size",
})


def refusals(data: bytes) -> list[str]:
    """Why ``data`` (a ``.pt2`` archive's bytes) cannot be read without trusting it; ``[]``
    when it is a plain program that :func:`load_untrusted` reads without running its code."""
    import torch

    problems: list[str] = []
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = [n for n in archive.namelist() if not n.endswith("/")]
    except zipfile.BadZipFile as exc:
        return [f"not a zip archive ({exc})"]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        return ["its entries are not all under one folder, as torch.export.save writes them"]
    root = roots.pop() + "/"
    relative = [n[len(root):] for n in names]
    if "version" in relative or any(n.startswith("serialized_") for n in relative):
        problems.append("the archive uses the old (torch <= 2.7) layout, whose loader "
                        "unpickles its payloads")
    for name in relative:
        if name.startswith("data/aotinductor/"):
            problems.append(f"{name}: compiled native code (AOTInductor), which loading runs")
        elif not any(p.fullmatch(name) for p in _ALLOWED):
            problems.append(f"{name}: not part of a plain torch.export program")
    if "archive_format" not in relative:
        problems.append("no archive_format entry: not an archive torch.export.save wrote")
    if problems:
        return problems[:5]
    for name in relative:
        entry = archive.read(root + name)
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            problems += _payload_config_refusals(name, entry)
        elif name.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(entry), weights_only=True)
            except Exception as exc:
                problems.append(f"{name}: sample inputs that need pickle beyond tensors "
                                f"({type(exc).__name__})")
        elif name.startswith("models/"):
            problems += _program_refusals(name, entry)
    return problems[:5]


def _payload_config_refusals(name: str, entry: bytes) -> list[str]:
    try:
        config = json.loads(entry)["config"]
        items = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{name}: not a payload config torch.export.save writes"]
    found = []
    for fqn, meta in items:
        if not isinstance(meta, dict):
            found.append(f"{name}: {fqn}: not a payload entry")
        elif meta.get("use_pickle") is not False:
            found.append(f"{name}: {fqn} is pickled")
        elif not _PAYLOAD_NAME.fullmatch(str(meta.get("path_name", ""))):
            found.append(f"{name}: {fqn} is a custom or opaque object "
                         f"({meta.get('path_name')!r}), which loading unpickles")
    return found


def _program_refusals(name: str, entry: bytes) -> list[str]:
    try:
        program = json.loads(entry)
    except ValueError:
        return [f"{name}: not JSON"]
    found: list[str] = []
    for key, value in _walk(program):
        if key in ("target", "as_operator") and isinstance(value, str):
            if not _safe_target(value):
                found.append(f"{name}: the graph calls {value[:80]!r}, which is not a "
                             "registered operator")
        elif key == "expr_str" and isinstance(value, str) and not _safe_expression(value):
            found.append(f"{name}: a shape expression that is not plain arithmetic "
                         f"({value[:80]!r}); the loader would evaluate it as Python")
        elif key in ("in_spec", "out_spec") and isinstance(value, str) and not _plain_spec(
                value):
            found.append(f"{name}: input or output names that are not plain identifiers "
                         "(they are written into generated Python code)")
        if len(found) >= 5:
            break
    return found


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _plain_spec(text: str) -> bool:
    """A serialized pytree spec whose keys are identifiers or numbers (no quotes or code)."""
    try:
        spec = json.loads(text)
    except ValueError:
        return False
    for key, value in _walk(spec):
        if key != "context" or value is None:
            continue
        try:
            context = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            return False
        items = context if isinstance(context, list) else [context]
        if not all(item is None or isinstance(item, int | float) or (
                isinstance(item, str) and re.fullmatch(r"[\w.]*", item)) for item in items):
            return False
    return True


def _safe_target(target: str) -> bool:
    """A node target the deserializer resolves to a registered operator or a pure function."""
    import math
    import operator

    import torch

    parts = target.split(".")
    if parts[0] == "_operator":
        return len(parts) == 2 and parts[1] in _OPERATOR_FUNCTIONS and hasattr(operator,
                                                                               parts[1])
    if parts[0] == "math":
        return len(parts) == 2 and callable(getattr(math, parts[1], None))
    if parts[0] != "torch":
        return False  # '#'-extension operators and anything else the deserializer resolves
    if len(parts) == 2:
        return parts[1] in _TORCH_SYM_FUNCTIONS
    if parts[1] != "ops" or not 4 <= len(parts) <= 5 or any(p.startswith("__") for p in parts):
        return False
    try:
        resolved: Any = torch.ops
        for part in parts[2:]:
            resolved = getattr(resolved, part)
    except (AttributeError, RuntimeError):
        return False
    return isinstance(resolved, torch._ops.OpOverload | torch._ops.OpOverloadPacket
                      | torch._ops.HigherOrderOperator)


def _safe_expression(text: str) -> bool:
    """Only numbers, operators, symbol names and the sympy functions torch prints: nothing
    that could reach an attribute, a subscript or a Python builtin when evaluated."""
    if len(text) > 10_000:
        return False
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            return False
        name, string = match.group("name"), match.group("string")
        if name is not None and name not in _SYMPY_NAMES and not _SYMBOL.fullmatch(name):
            return False
        if string is not None and not _SYMBOL.fullmatch(string[1:-1]):
            return False
        position = match.end()
    return True


_GUARD = threading.Lock()


class _Refused(Exception):
    pass


def _refuse(*_args: Any, **_kwargs: Any) -> Any:
    raise _Refused("unpickling is refused for an archive that is not trusted")


class _RefusingUnpickler:
    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        _refuse()


@contextlib.contextmanager
def _no_unpickling() -> Iterator[None]:
    """Every unpickler torch's loader can reach refuses, and ``torch.load`` only loads with
    ``weights_only=True`` (its restricted unpickler builds tensors and containers only)."""
    import pickle

    import torch
    from torch.export.pt2_archive import _package

    real_load = torch.load

    def weights_only_load(*args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        if weights_only is False:
            _refuse()
        return real_load(*args, weights_only=True, **kwargs)

    patches = [(pickle, "loads", _refuse), (pickle, "load", _refuse),
               (pickle, "Unpickler", _RefusingUnpickler), (torch, "load", weights_only_load),
               (torch._C, "_pickle_load_obj", _refuse), (_package, "_load_aoti", _refuse)]
    with _GUARD:
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        try:
            for owner, attr, replacement in patches:
                setattr(owner, attr, replacement)
            yield
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)


def load_untrusted(data: bytes) -> Any:
    """The ``ExportedProgram`` in ``data``, read by torch's new-layout loader with every
    unpickler refusing. Call :func:`refusals` first; raises ``ValueError`` when the archive
    cannot be read this way."""
    from torch.export.pt2_archive._package import load_pt2

    try:
        with _no_unpickling():
            contents = load_pt2(io.BytesIO(data))
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if "model" not in contents.exported_programs:
        raise ValueError("the archive holds no program named 'model'")
    return contents.exported_programs["model"]
