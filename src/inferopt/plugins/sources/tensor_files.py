"""Data in files: tensors (``.pt``/``.pth``, ``.npy``, ``.npz``, ``.safetensors``) and tables
(``.csv``).

Tensor files (``tensors`` scheme, or recognised by their suffix):

* ``.npy``: one array, the inputs; ``labels=OTHER.npy`` adds labels from a second file.
* ``.npz``, ``.safetensors``, or a ``.pt`` holding a dict: named arrays. The labels are the
  entry ``labels=NAME`` names, else one called ``labels``/``label``/``y``/``targets``. The
  inputs are ``inputs=NAME`` (``inputs=input_ids|attention_mask`` for several keyword inputs),
  else one called ``inputs``/``input``/``x``, else the only other entry, else all other entries
  as keyword inputs (``model(input_ids=..., attention_mask=...)``).
* ``.pt``/``.pth``: read with ``torch.load(weights_only=True)`` (nothing but tensors and
  containers is unpickled): a tensor, ``(inputs, labels)``, or a dict as above.

CSV (``csv`` scheme, or ``.csv``): a header row names the columns; every column but the label
column is a float feature. The label column is ``label=NAME`` (or a 0-based index), else one
called ``label``/``labels``/``target``/``y``/``class``; ``label=none`` means no labels. Integer
labels are class indices; other labels are mapped to indices in sorted order.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Any

import attrs

from inferopt import Data, DataSource, UsageError, hookimpl, option
from inferopt.plugins.sources.torch_file import refusal_reason
from inferopt.utils import build_options as build
from inferopt.utils import parse_target_spec

TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".safetensors")
LABEL_NAMES = ("labels", "label", "y", "targets", "target", "class")
INPUT_NAMES = ("inputs", "input", "x")


@attrs.frozen
class TensorFileSpec:
    """Options of a tensor-file data spec."""

    inputs: tuple[str, ...] = option((), help="entry name(s) of the inputs; several become "
                                              "keyword inputs")
    labels: str = option("", help="entry name of the labels (.npy: a second .npy file)")


@attrs.frozen
class CsvSpec:
    """Options of a CSV data spec."""

    label: str = option("", help="label column name or 0-based index; 'none' for no labels")
    features: tuple[str, ...] = option((), help="feature columns (default: all but the label)")


def _as_tensor(value: Any, what: str) -> Any:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise UsageError(f"{what} holds Python objects, not numbers")
        if value.dtype == np.float64:  # NumPy's default; models take float32
            value = value.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(value))
    raise UsageError(f"{what} is a {type(value).__name__}, not an array or tensor")


def _read_entries(path: Path, spec: str) -> Any:
    """The file's content: a tensor, a tuple, or a dict of name -> tensor."""
    import numpy as np
    import torch

    what = f"--data {spec!r}"
    unreadable = (f"{what}: {str(path)!r} could not be read as a {path.suffix} file; is it "
                  "complete (a download or copy cut short gives this)?")
    if path.suffix == ".npy":
        try:
            return _as_tensor(np.load(path, allow_pickle=False), what)
        except UsageError:
            raise
        except Exception as exc:  # truncated or not an array file at all
            raise UsageError(f"{unreadable} ({type(exc).__name__}: {exc})") from None
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {k: _as_tensor(archive[k], f"{what} entry {k!r}") for k in archive.files}
        except UsageError:
            raise
        except ValueError as exc:
            raise UsageError(f"{what}: {exc}") from None
        except Exception as exc:
            raise UsageError(f"{unreadable} ({type(exc).__name__}: {exc})") from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise UsageError(f"{unreadable} ({type(exc).__name__}: {exc})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise UsageError(
            f"{what}: {str(path)!r} holds more than tensors, and data files are only read with "
            "torch.load(weights_only=True). Save tensors, a tuple or a dict of tensors, or use "
            f"python:MODULE:CALLABLE to build the data in code ({refusal_reason(exc)[:120]})"
        ) from None


def _pick(entries: dict[str, Any], opts: TensorFileSpec, spec: str) -> tuple[Any, Any]:
    what = f"--data {spec!r}"
    entries = {k: _as_tensor(v, f"{what} entry {k!r}") for k, v in entries.items()}
    for name in (*opts.inputs, *([opts.labels] if opts.labels else [])):
        if name not in entries:
            raise UsageError(f"{what}: no entry {name!r}; it has: {', '.join(entries)}")
    label_key = opts.labels or next((k for k in LABEL_NAMES if k in entries), "")
    labels = entries.pop(label_key) if label_key else None
    if opts.inputs:
        names = list(opts.inputs)
    else:
        named = next((k for k in INPUT_NAMES if k in entries), None)
        names = [named] if named else list(entries)
    if not names:
        raise UsageError(f"{what}: no inputs besides the labels {label_key!r}")
    inputs = entries[names[0]] if len(names) == 1 else {k: entries[k] for k in names}
    return inputs, labels


def _batches(inputs: Any, labels: Any, batch_size: int, spec: str) -> list[Any]:
    from inferopt import Batch

    first = inputs if not isinstance(inputs, dict) else next(iter(inputs.values()))
    n = int(first.shape[0]) if first.dim() else 0
    columns = inputs.values() if isinstance(inputs, dict) else [inputs]
    if n == 0 or any(t.dim() == 0 or t.shape[0] != n for t in columns) or (
            labels is not None and (labels.dim() == 0 or labels.shape[0] != n)):
        raise UsageError(f"--data {spec!r}: inputs and labels must share a first (sample) "
                         "dimension of at least 1")

    def rows(value: Any, i: int) -> Any:
        if isinstance(value, dict):
            return {k: v[i:i + batch_size] for k, v in value.items()}
        return value[i:i + batch_size]

    return [Batch(inputs=rows(inputs, i),
                  labels=None if labels is None else labels[i:i + batch_size])
            for i in range(0, n, batch_size)]


class TensorFiles(DataSource):
    """Inputs (and optional labels) from ``.pt``/``.npy``/``.npz``/``.safetensors`` files."""

    scheme = "tensors"
    spec_options = TensorFileSpec
    summary = "PATH.pt/.npy/.npz/.safetensors[:inputs=NAME,labels=NAME]: tensors on disk"

    def claims(self, spec: str) -> bool:
        return parse_target_spec(spec, self.scheme, "--data")[0].endswith(TENSOR_SUFFIXES)

    def load(self, spec: str, ctx: Any) -> Data:
        import torch

        target, raw = parse_target_spec(spec, self.scheme, "--data")
        opts = build(TensorFileSpec, raw, f"--data {spec!r}")
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(f"--data {spec!r}: file {str(path)!r} does not exist")
        if path.suffix not in TENSOR_SUFFIXES:
            raise UsageError(f"--data {spec!r}: give a {'/'.join(TENSOR_SUFFIXES)} file")
        content = _read_entries(path, spec)
        if path.suffix == ".npy" or isinstance(content, torch.Tensor):
            labels = None
            if opts.labels:
                label_path = Path(opts.labels).expanduser()
                if not label_path.is_file():
                    raise UsageError(f"--data {spec!r}: labels file {opts.labels!r} does not "
                                     "exist (a single-array file takes labels=OTHER_FILE.npy)")
                labels = _read_entries(label_path, spec)
            inputs = content
        elif isinstance(content, tuple | list) and len(content) == 2:
            inputs, labels = (_as_tensor(v, f"--data {spec!r}") for v in content)
        elif isinstance(content, dict):
            inputs, labels = _pick(content, opts, spec)
        else:
            raise UsageError(f"--data {spec!r} holds a {type(content).__name__}; save a tensor, "
                             "(inputs, labels) or a dict of tensors")
        batches = _batches(inputs, labels, ctx.batch_size, spec)
        keys = f" {sorted(inputs)}" if isinstance(inputs, dict) else ""
        return Data(eval=batches, description=(
            f"{sum(b.size for b in batches)} samples{keys} from {path.name}"
            + (" with labels" if labels is not None else "")))


class CsvData(DataSource):
    """Rows of a CSV file: float feature columns and an optional label column."""

    scheme = "csv"
    spec_options = CsvSpec
    summary = "PATH.csv[:label=COLUMN,features=a|b]: feature columns and a label column"

    def claims(self, spec: str) -> bool:
        return parse_target_spec(spec, self.scheme, "--data")[0].endswith(".csv")

    def load(self, spec: str, ctx: Any) -> Data:
        import torch

        target, raw = parse_target_spec(spec, self.scheme, "--data")
        opts = build(CsvSpec, raw, f"--data {spec!r}")
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(f"--data {spec!r}: file {str(path)!r} does not exist")
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column name
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
        if len(rows) < 2:
            raise UsageError(f"--data {spec!r}: needs a header row and at least one data row")
        header, body = [h.strip() for h in rows[0]], rows[1:]
        label_col = self._label_column(header, opts, spec)
        features = list(opts.features) or [h for i, h in enumerate(header) if i != label_col]
        missing = [f for f in features if f not in header]
        if missing:
            raise UsageError(f"--data {spec!r}: no column(s) {', '.join(missing)}; the header "
                             f"has: {', '.join(header)}")
        index = [header.index(f) for f in features]
        values = []
        for line, row in enumerate(body, start=2):
            if len(row) != len(header):
                raise UsageError(f"--data {spec!r}: line {line} has {len(row)} fields, the "
                                 f"header {len(header)}")
            try:
                values.append([float(row[i]) for i in index])
            except ValueError:
                bad = next(header[i] for i in index if not _is_float(row[i]))
                raise UsageError(f"--data {spec!r}: line {line}, column {bad!r} is not a "
                                 "number; features must be numeric (choose columns with "
                                 "features=a|b|c)") from None
        inputs = torch.tensor(values, dtype=torch.float32)
        labels = None
        note = ""
        if label_col is not None:
            raw_labels = [row[label_col].strip() for row in body]
            if all(_is_int(v) for v in raw_labels):
                labels = torch.tensor([int(float(v)) for v in raw_labels], dtype=torch.long)
            else:
                classes = sorted(set(raw_labels))
                labels = torch.tensor([classes.index(v) for v in raw_labels], dtype=torch.long)
                note = f"; labels {', '.join(classes[:10])} -> 0..{len(classes) - 1}"
        batches = _batches(inputs, labels, ctx.batch_size, spec)
        label_name = header[label_col] if label_col is not None else None
        return Data(eval=batches, description=(
            f"{len(body)} rows of {path.name}: {len(features)} features"
            + (f", label column {label_name!r}" if label_name else ", no labels") + note))

    def _label_column(self, header: list[str], opts: CsvSpec, spec: str) -> int | None:
        if opts.label.lower() == "none":
            return None
        if opts.label:
            if opts.label in header:
                return header.index(opts.label)
            if opts.label.isdigit() and int(opts.label) < len(header):
                return int(opts.label)
            raise UsageError(f"--data {spec!r}: no column {opts.label!r}; the header has: "
                             f"{', '.join(header)}")
        return next((header.index(n) for n in LABEL_NAMES if n in header), None)


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_int(text: str) -> bool:
    return _is_float(text) and float(text).is_integer()


@hookimpl
def inferopt_register_datasets(register: Any) -> None:
    register(TensorFiles)
    register(CsvData)
