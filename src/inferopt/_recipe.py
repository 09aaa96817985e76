"""A run is a Recipe: model, data, backend, ordered optimizer steps, metrics, gates, output.

Read from a TOML file, from CLI flags, or both (flags win, field by field). Steps, backends
and metrics are written ``NAME[:key=value,...]`` on the command line, or as a string or a table
with ``name`` in TOML. List-valued options use ``|`` on the command line
(``skip=head|classifier``) and arrays in TOML.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from inferopt._errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "demo:digits-mlp"
DEFAULT_OPTIMIZE = ("int8",)
DEFAULT_METRICS = ("latency", "throughput", "accuracy", "fidelity", "size")
NO_STEPS = "none"


@attrs.frozen
class Spec:
    """A plugin name with its options, as given (values still raw)."""

    name: str
    options: dict[str, Any] = attrs.field(factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        opts = ",".join(f"{k}={_fmt(v)}" for k, v in self.options.items())
        return f"{self.name}:{opts}"


def _fmt(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "|".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse_spec(text: str, what: str) -> Spec:
    """Parse ``NAME[:key=value,...]``; ``what`` names the flag in errors."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"{what} {text!r}: missing name; write NAME or NAME:key=value,...")
    options: dict[str, Any] = {}
    if rest.strip():
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise UsageError(
                    f"{what} {text!r}: {part!r} is not key=value; "
                    f"write {name}:key=value,key2=value2"
                )
            if key.strip() in options:
                raise UsageError(
                    f"{what} {text!r}: option {key.strip()!r} is given twice "
                    f"({options[key.strip()]!r} and {value.strip()!r}); give it once"
                )
            options[key.strip()] = value.strip()
    return Spec(name, options)


def parse_target_spec(text: str, scheme: str, what: str) -> tuple[str, dict[str, Any]]:
    """Parse a source spec ``[SCHEME:]TARGET[:key=value,...]`` (``text:lines.txt:max_length=64``,
    ``data.csv:label=y``) into the target (a path, a directory, an id) and its raw options.
    The options are the part after the last colon when it reads ``key=value``."""
    body = text[len(scheme) + 1 :] if text.startswith(scheme + ":") else text
    target, sep, tail = body.rpartition(":")
    if sep and re.match(r"^\s*[A-Za-z_]\w*\s*=", tail):
        return target, parse_spec(f"{scheme}:{tail}", what).options
    return body, {}


def _spec_from_toml(value: Any, where: str) -> Spec:
    if isinstance(value, str):
        return parse_spec(value, where)
    if isinstance(value, Mapping):
        if "name" not in value:
            raise UsageError(f"{where}: a table needs a 'name' key, got keys {sorted(value)}")
        opts = {k: v for k, v in value.items() if k != "name"}
        return Spec(str(value["name"]), dict(opts))
    raise UsageError(f"{where}: expected a string or a table, got {type(value).__name__}")


class Gates:
    """Thresholds that make the run exit 1 when not met, by gate name. The names are the gates
    the metrics declare (``Metric.gates``: ``max_accuracy_drop``, ``min_speedup``...); they are
    checked against the installed metrics when the run's plugins are resolved."""

    def __init__(self, values: Mapping[str, float | None] | None = None,
                 **named: float | None) -> None:
        merged = {**(values or {}), **named}
        self._values: dict[str, float] = {}
        for key, value in merged.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise UsageError(f"gate {key} got {value!r}; give a finite number")
            self._values[key] = float(value)

    def get(self, name: str) -> float | None:
        return self._values.get(name)

    def to_dict(self) -> dict[str, float]:
        return dict(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Gates) and other._values == self._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return f"Gates({self._values!r})"


@attrs.frozen
class Split:
    """How many samples go to each split, drawn without overlap from all the data's samples
    after a shuffle with ``seed``. An unset ``eval`` takes the samples left over; an unset
    ``calibration`` means calibrating on the eval data, an unset ``train`` training on the
    calibration data (both as when the source has no split of its own)."""

    calibration: int | None = None
    train: int | None = None
    eval: int | None = None
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        for key in ("calibration", "train", "eval"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise UsageError(f"split {key}={value!r}: give a positive number of samples")

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


def parse_split(text: str, where: str = "--split") -> Split:
    """``eval=512,calibration=256,train=1024,seed=0`` -> :class:`Split`."""
    allowed = {f.name for f in attrs.fields(Split)}
    values: dict[str, int] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise UsageError(
                f"{where} {text!r}: {part!r} is not one of {', '.join(sorted(allowed))}=N; "
                "write for example --split eval=512,calibration=256,seed=0"
            )
        try:
            values[key] = int(value)
        except ValueError:
            raise UsageError(f"{where} {text!r}: {key}={value!r} is not an integer") from None
    return Split(**values)


@attrs.frozen
class Recipe:
    """Everything a run needs, before plugins are resolved."""

    model: str = DEFAULT_MODEL
    data: str | None = None
    backend: Spec = Spec("cpu")
    # where the baseline is measured, when not on ``backend`` (None: on ``backend``)
    baseline_backend: Spec | None = None
    optimize: tuple[Spec, ...] = tuple(Spec(n) for n in DEFAULT_OPTIMIZE)
    metrics: tuple[Spec, ...] = tuple(Spec(n) for n in DEFAULT_METRICS)
    metrics_explicit: bool = False
    batch_size: int = attrs.field(default=64)
    seed: int = 0
    out: str | None = None
    gates: Gates = Gates()
    output: str | None = None
    split: Split | None = None
    trust_model: bool = False
    keep_going: bool = False  # a failed step is recorded and undone, and the run goes on
    allow_collapse: bool = False  # a step whose outputs collapse is a warning, not an error
    batch_size_explicit: bool = False  # the user chose batch_size (checked against the data)
    source: str = "defaults"

    @batch_size.validator
    def _check_batch(self, _attr: Any, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"batch_size must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "backend": str(self.backend),
            "baseline_backend": str(self.baseline_backend) if self.baseline_backend else None,
            "optimize": [str(s) for s in self.optimize],
            "metrics": [str(s) for s in self.metrics],
            "batch_size": self.batch_size,
            "seed": self.seed,
            "out": self.out,
            "gates": self.gates.to_dict(),
            "output": self.output,
            "split": self.split.to_dict() if self.split else None,
            "trust_model": self.trust_model,
            "keep_going": self.keep_going,
            "allow_collapse": self.allow_collapse,
        }


_TOP_KEYS = {
    "model",
    "data",
    "backend",
    "baseline_backend",
    "optimize",
    "metrics",
    "batch_size",
    "seed",
    "out",
    "gates",
    "output",
    "split",
    "trust_model",
    "keep_going",
    "allow_collapse",
}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a recipe TOML file into recipe fields (validated, not yet merged)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe file {str(p)!r} does not exist; give the path to a .toml recipe")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"recipe file {str(p)!r} is not valid TOML: {exc}") from None
    return fields_from_mapping(doc, where=f"recipe {p.name}")


def fields_from_mapping(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    fields: dict[str, Any] = {}
    for key in ("model", "data", "out", "output"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise UsageError(f"{where}: {key!r} must be a string, got {doc[key]!r}")
            fields[key] = doc[key]
    for key in ("batch_size", "seed"):
        if key in doc:
            if not isinstance(doc[key], int) or isinstance(doc[key], bool):
                raise UsageError(f"{where}: {key!r} must be an integer, got {doc[key]!r}")
            fields[key] = doc[key]
    for key in ("trust_model", "keep_going", "allow_collapse"):
        if key in doc:
            if not isinstance(doc[key], bool):
                raise UsageError(f"{where}: {key!r} must be true or false, got {doc[key]!r}")
            fields[key] = doc[key]
    if "batch_size" in fields:
        fields["batch_size_explicit"] = True
    if "split" in doc:
        split = doc["split"]
        allowed = {f.name for f in attrs.fields(Split)}
        if not isinstance(split, Mapping) or set(split) - allowed:
            raise UsageError(
                f"{where}: [split] accepts {', '.join(sorted(allowed))}; got {split!r}")
        for k, v in split.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise UsageError(f"{where}: split.{k} must be an integer, got {v!r}")
        fields["split"] = Split(**split)
    for key in ("backend", "baseline_backend"):
        if doc.get(key) is not None:  # a saved recipe says baseline_backend = null
            fields[key] = _spec_from_toml(doc[key], f"{where}: {key}")
    for key in ("optimize", "metrics"):
        if key in doc:
            items = doc[key]
            if not isinstance(items, list):
                raise UsageError(f"{where}: {key!r} must be an array, got {items!r}")
            fields[key] = tuple(
                _spec_from_toml(item, f"{where}: {key}[{i}]") for i, item in enumerate(items)
            )
    if "metrics" in fields:
        fields["metrics_explicit"] = True
    if "gates" in doc:
        gates = doc["gates"]
        if not isinstance(gates, Mapping):
            raise UsageError(f"{where}: [gates] must be a table of NAME = number; got {gates!r}")
        flat: dict[str, Any] = {}
        for k, v in gates.items():
            if isinstance(v, Mapping):  # [gates.METRIC] or METRIC.GATE = x: qualified names
                flat.update({f"{k}.{g}": x for g, x in v.items()})
            else:
                flat[str(k)] = v
        for k, v in flat.items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise UsageError(f"{where}: gates.{k} must be a number, got {v!r}")
        fields["gates"] = Gates({str(k): float(v) for k, v in flat.items()})
    return fields


def make_recipe(
    recipe_file: str | Path | None = None,
    *,
    model: str | None = None,
    data: str | None = None,
    backend: str | None = None,
    baseline_backend: str | None = None,
    optimize: list[str] | tuple[str, ...] | None = None,
    metrics: list[str] | tuple[str, ...] | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    out: str | None = None,
    gates: Mapping[str, float | None] | None = None,
    output: str | None = None,
    split: str | Split | None = None,
    trust_model: bool | None = None,
    keep_going: bool | None = None,
    allow_collapse: bool | None = None,
) -> Recipe:
    """Build a recipe from an optional TOML file and overrides (CLI flags win)."""
    fields: dict[str, Any] = {}
    source = "defaults"
    if recipe_file is not None:
        fields.update(load_toml(recipe_file))
        source = str(recipe_file)
    if model is not None:
        fields["model"] = model
    if data is not None:
        fields["data"] = data
    if backend is not None:
        fields["backend"] = parse_spec(backend, "--backend")
    if baseline_backend is not None:
        fields["baseline_backend"] = parse_spec(baseline_backend, "--baseline-backend")
    if optimize is not None:
        steps = [parse_spec(s, "--optimize") for s in optimize]
        fields["optimize"] = tuple(s for s in steps if s.name != NO_STEPS)
    elif "optimize" in fields:
        fields["optimize"] = tuple(s for s in fields["optimize"] if s.name != NO_STEPS)
    if metrics is not None:
        fields["metrics"] = tuple(parse_spec(m, "--metric") for m in metrics)
        fields["metrics_explicit"] = True
    if batch_size is not None:
        fields["batch_size"] = batch_size
        fields["batch_size_explicit"] = True
    if seed is not None:
        fields["seed"] = seed
    if not 0 <= fields.get("seed", 0) < 2**63:
        raise UsageError(f"--seed {fields['seed']}: give a seed from 0 to {2**63 - 1} "
                         "(torch's generator takes a 64-bit seed)")
    if out is not None:
        fields["out"] = out
    if output is not None:
        fields["output"] = output or None
    if split is not None:
        fields["split"] = split if isinstance(split, Split) else parse_split(split)
    if trust_model:  # a flag can only grant trust; leaving it off keeps the file's setting
        fields["trust_model"] = True
    if keep_going:
        fields["keep_going"] = True
    if allow_collapse:
        fields["allow_collapse"] = True
    if gates:
        # names are checked against the installed metrics' gates when plugins are resolved
        merged = fields.get("gates", Gates()).to_dict()
        merged.update({k: v for k, v in gates.items() if v is not None})
        fields["gates"] = Gates(merged)
    if fields.get("baseline_backend") == fields.get("backend", Spec("cpu")):
        fields.pop("baseline_backend", None)  # the baseline runs there anyway
    return Recipe(source=source, **fields)
