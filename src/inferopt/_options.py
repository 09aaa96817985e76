"""Typed options for plugin classes (optimizers, backends, metrics, and sources' specs).

A plugin declares its options as attrs fields made with :func:`option`. Values arrive as
strings from the CLI (``--optimize int8:mode=static,skip=head``) or as typed values from a TOML
recipe; :func:`build` converts them by the field's type, checks the declared choices and range,
and reports a bad value with the step, the option, the value and what is allowed. An option's
``validator`` adds a check of its own, reported the same way.
"""

from __future__ import annotations

import difflib
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from inferopt._errors import UsageError

LIST_SEPARATOR = "|"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option(
    default: Any = attrs.NOTHING,
    *,
    help: str = "",  # shadows the builtin on purpose: the natural keyword for users
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    searchable: Sequence[Any] | None = None,
    validator: Callable[[Any], str | None] | None = None,
    key: str | None = None,
) -> Any:
    """Declare one option of a plugin class (an attrs field with metadata).

    ``choices`` restricts the value to a set, ``min``/``max`` to a closed range. ``searchable``
    lists values worth trying when searching for a recipe. ``help`` is shown by
    ``inferopt plugins`` and in errors. ``validator(value)`` checks a converted value further:
    it raises ValueError/TypeError or returns an error message (None or "" when the value is
    fine), and the message becomes a UsageError naming the step, the option and the value.
    ``key`` is how users spell the option when that cannot be a Python name (``class=`` for a
    field ``cls``); listings show it, and specs and configs accept it.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "min": min,
        "max": max,
        "searchable": tuple(searchable) if searchable is not None else None,
        "validator": validator,
        "key": key,
    }
    return attrs.field(default=default, metadata={"inferopt": metadata})


def _meta(field: attrs.Attribute) -> dict[str, Any]:
    return dict(field.metadata.get("inferopt") or {})


def _hints(cls: type) -> dict[str, Any]:
    """Field types; a plugin whose annotations cannot be resolved (a name imported only for
    type checking) gets its options unconverted rather than breaking every listing."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # any failure: fall back to the raw annotations
        return {}


def json_safe(value: Any) -> Any:
    """An option value as JSON can hold it (paths and enums become strings)."""
    if isinstance(value, tuple | list):
        return [json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def describe(cls: type) -> list[dict[str, Any]]:
    """The options of a plugin class as plain data: name, type, default, help, choices, range,
    and the values worth trying in a search (``searchable``, None when not declared)."""
    if not attrs.has(cls):
        return []
    hints = _hints(cls)
    out = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        meta = _meta(field)
        default = None if field.default is attrs.NOTHING else field.default
        out.append(
            {
                "name": meta.get("key") or field.name,
                "type": _type_name(hints.get(field.name, field.type or Any)),
                "default": json_safe(default),
                "help": meta.get("help", ""),
                "choices": json_safe(list(meta["choices"])) if meta.get("choices") else None,
                "min": meta.get("min"),
                "max": meta.get("max"),
                "searchable": (json_safe(list(meta["searchable"]))
                               if meta.get("searchable") is not None else None),
            }
        )
    return out


def build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    """Instantiate ``cls`` from raw option values; ``where`` names the step in error messages
    (for example ``"step 1 'int8'"``)."""
    if not attrs.has(cls):
        if raw:
            raise UsageError(f"{where} takes no options, got {', '.join(raw)}")
        return cls()
    hints = _hints(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    keys = {_meta(f).get("key"): n for n, f in fields.items() if _meta(f).get("key")}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = keys.get(key) or key.replace("-", "_")
        if name not in fields:
            spelled = [_meta(f).get("key") or n for n, f in fields.items()]
            known = ", ".join(spelled) or "(none)"
            close = difflib.get_close_matches(name, spelled, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{where}: unknown option {key!r}. Options: {known}.{hint}")
        field = fields[name]
        values[name] = _convert(value, hints.get(name, Any), field, where)
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in values]
    if missing:
        raise UsageError(f"{where}: missing required option(s) {', '.join(missing)}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: invalid options {dict(raw)}: {exc}") from exc


def _allowed(field: attrs.Attribute, tp: Any) -> str:
    meta = _meta(field)
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    parts = []
    if meta.get("min") is not None:
        parts.append(f">= {meta['min']}")
    if meta.get("max") is not None:
        parts.append(f"<= {meta['max']}")
    kind = _type_name(tp)
    return f"{kind} {' and '.join(parts)}".strip()


def _convert(value: Any, tp: Any, field: attrs.Attribute, where: str) -> Any:
    def bad(reason: str = "") -> UsageError:
        extra = f" ({reason})" if reason else ""
        return UsageError(
            f"{where}: option {field.name!r} got {value!r}{extra}; allowed: {_allowed(field, tp)}"
        )

    try:
        converted = _coerce(value, tp)
    except (ValueError, TypeError) as exc:
        raise bad(str(exc)) from None
    meta = _meta(field)
    choices = meta.get("choices")
    if choices:
        items = converted if isinstance(converted, tuple) else (converted,)
        if any(item not in choices for item in items):
            raise bad()
    low, high = meta.get("min"), meta.get("max")
    if isinstance(converted, int | float) and not isinstance(converted, bool):
        if isinstance(converted, float) and not math.isfinite(converted):
            raise bad("not a finite number")
        if (low is not None and converted < low) or (high is not None and converted > high):
            raise bad()
    validator = meta.get("validator")
    if validator is not None:
        try:
            problem = validator(converted)
        except (ValueError, TypeError) as exc:
            problem = str(exc) or type(exc).__name__
        if problem:
            raise UsageError(f"{where}: option {field.name!r} got {value!r}: {problem}")
    return converted


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or "not convertible")
    if origin is typing.Literal:
        for arg in args:
            if value == arg or (isinstance(value, str) and str(arg) == value):
                return arg
        raise ValueError("not one of the allowed values")
    if origin in (tuple, list) or tp in (tuple, list):
        item_tp = args[0] if args else str
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return tuple(_coerce(item, item_tp) for item in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value)
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if tp is not Any and isinstance(tp, type) and isinstance(value, str) \
            and not isinstance(value, tp):
        # other simple option types (pathlib.Path, an Enum by value, ...) take the string
        if issubclass(tp, enum.Enum):
            try:
                return tp(value)
            except ValueError:
                return tp[value]
        constructor: Any = tp
        return constructor(value)
    return value


def _type_name(tp: Any) -> str:
    if tp in (int, float, str, bool):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return f"list of {_type_name(typing.get_args(tp)[0])} (separate with '{LIST_SEPARATOR}')"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(
            "none" if a is type(None) else _type_name(a) for a in typing.get_args(tp)
        )
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))
