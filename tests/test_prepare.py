"""Preparing on the backend: the context a backend gets, the per-role cache, artifact staging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

import inferopt
from inferopt import PluginError, PrepareContext
from inferopt._prepare import Preparer, takes_context
from inferopt.utils import backend_refuses, get_logger


@attrs.frozen
class CountingBackend(inferopt.Backend):
    name = "counting"
    calls: list[str] = attrs.field(factory=list)

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        self.calls.append(ctx.role)
        ctx.artifact_path("model.bin").write_bytes(b"x" * len(self.calls))
        return model.eval()


@attrs.frozen
class OldBackend(inferopt.Backend):
    name = "old"

    def prepare(self, model: Any) -> Any:
        return model


@attrs.frozen
class Int8Hater(inferopt.Backend):
    name = "int8-hater"

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        return model

    def refuses(self, optimizer: Any) -> str | None:
        return "no int8 kernels" if optimizer.name == "int8" else None


def test_an_unchanged_model_is_prepared_once_per_role(tmp_path: Path) -> None:
    backend = CountingBackend()
    preparer = Preparer(backend, torch.zeros(2, 3), get_logger(), [])
    model = torch.nn.Linear(3, 2)
    first = preparer.prepare(model, "baseline")
    assert preparer.prepare(model, "baseline") is first
    preparer.prepare(model, "optimized")
    assert backend.calls == ["baseline", "optimized"]
    preparer.changed(model)  # a step changed it in place: prepare afresh, keep the last files
    preparer.prepare(model, "optimized")
    assert backend.calls == ["baseline", "optimized", "optimized"]
    assert preparer.artifacts() == {"baseline": ["model.bin"], "optimized": ["model.bin"]}
    listing = preparer.move_into(tmp_path, Path("runs/x"))
    assert listing["optimized"]["model.bin"] == str(Path("runs/x/backend/optimized/model.bin"))
    assert (tmp_path / "backend" / "optimized" / "model.bin").read_bytes() == b"xxx"
    preparer.close()
    assert not preparer.staging.exists()


def test_one_argument_prepare_is_detected_and_flagged() -> None:
    assert takes_context(CountingBackend()) and not takes_context(OldBackend())
    warnings: list[str] = []
    model = torch.nn.Linear(3, 2)
    assert Preparer(OldBackend(), None, get_logger(), warnings).prepare(model, "baseline") \
        is model
    assert "deprecated" in warnings[0] and "'old'" in warnings[0]


@pytest.mark.parametrize("name", ["../escape.onnx", "/abs/model.onnx", "", "a/../b", "C:x"])
def test_artifact_names_stay_inside_the_run(name: str) -> None:
    with pytest.raises(PluginError, match="relative path"):
        PrepareContext().artifact_path(name)


def test_a_context_built_by_hand_works_for_plugin_tests() -> None:
    ctx = PrepareContext(example_inputs=torch.zeros(1, 3))
    path = ctx.artifact_path("sub/model.onnx")
    path.write_text("graph")
    assert path.read_text() == "graph" and ctx.role == "baseline"
    ctx.warn("careful")
    assert ctx.warnings == ["careful"]


def test_backend_refuses_names_the_backend_and_its_reason() -> None:
    @attrs.frozen
    class Int8(inferopt.Optimizer):
        name = "int8"

        def apply(self, model: Any, ctx: Any) -> Any:
            return model

    reason = backend_refuses(Int8Hater(), Int8())
    assert reason is not None and "'int8-hater'" in reason and "no int8 kernels" in reason
    assert backend_refuses(CountingBackend(), Int8()) is None


def test_a_run_that_does_not_save_keeps_no_artifact(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the staging folder lands here
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    report = inferopt.run(model="demo:digits-mlp-small", metrics=["fidelity"], save=False)
    assert report.artifacts == {}
    assert set(report.prepare_seconds) == {"baseline", "optimized"}
    assert not list(tmp_path.glob("inferopt-backend-artifacts-*"))
