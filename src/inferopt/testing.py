"""``inferopt.testing``: pytest fixtures for plugin authors (and inferopt's own tests).

Installed with inferopt and loaded by pytest through the ``pytest11`` entry point, so a plugin's
test suite can use these fixtures without importing anything:

* ``inferopt_plugins``: a fresh plugin manager with every installed plugin loaded, and
  ``inferopt_registry``: what they registered;
* ``inferopt_cli``: run the ``inferopt`` command in process, in a fresh working directory;
  returns ``returncode``, ``stdout``, ``stderr``;
* ``tiny_model`` / ``tiny_model_factory`` and ``tiny_data``: a small seeded MLP and labelled data
  for it (``inferopt.Data``, with a calibration split);
* ``inferopt_roundtrip``: run one optimizer through the whole pipeline on the tiny model, save,
  rebuild with ``inferopt.load``, check the rebuilt model gives the same outputs; returns
  ``(report, loaded_model)``.

Importing this module does not import torch (the fixtures do, when used).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest


@attrs.frozen
class CliResult:
    """What an ``inferopt`` command run in process returned."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def _inferopt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inferopt-testing-cache")


@pytest.fixture
def inferopt_plugins() -> Any:
    """A fresh :class:`inferopt._manager.PluginManager` with all installed plugins loaded."""
    from inferopt._manager import PluginManager

    return PluginManager().load_entrypoints()


@pytest.fixture
def inferopt_registry(inferopt_plugins: Any) -> Any:
    """The :class:`inferopt._registry.Registry` built from ``inferopt_plugins``."""
    from inferopt._registry import Registry

    return Registry.from_manager(inferopt_plugins)


@pytest.fixture
def inferopt_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _inferopt_cache: Path
                 ) -> Callable[..., CliResult]:
    """``inferopt_cli(*args, env=None)`` runs ``inferopt ARGS`` in process in ``tmp_path``."""
    from click.testing import CliRunner

    from inferopt._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFEROPT_CACHE_DIR", os.environ.get("INFEROPT_CACHE_DIR",
                                                            str(_inferopt_cache)))

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        with monkeypatch.context() as m:
            for key, value in (env or {}).items():
                m.setenv(key, value)
            result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def tiny_model_factory() -> Callable[[], Any]:
    """A function building the same seeded MLP (16 -> 32 -> 4) on every call."""

    def build() -> Any:
        import torch

        gen = torch.Generator().manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 4))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        return model.eval()

    return build


@pytest.fixture
def tiny_model(tiny_model_factory: Callable[[], Any]) -> Any:
    return tiny_model_factory()


@pytest.fixture
def tiny_data(tiny_model_factory: Callable[[], Any]) -> Any:
    """4 eval and 4 calibration batches of 8 samples, labelled by the tiny model itself (so
    accuracy starts at 100% and any drop is the optimization's)."""
    import torch

    import inferopt

    gen = torch.Generator().manual_seed(1)
    teacher = tiny_model_factory()

    def batches() -> list[Any]:
        out = []
        for _ in range(4):
            x = torch.randn(8, 16, generator=gen)
            with torch.no_grad():
                out.append(inferopt.Batch(x, teacher(x).argmax(-1)))
        return out

    return inferopt.Data(eval=batches(), calibration=batches(), description="tiny")


@pytest.fixture
def inferopt_roundtrip(tmp_path: Path, tiny_model_factory: Callable[[], Any], tiny_data: Any
                       ) -> Callable[..., tuple[Any, Any]]:
    """``inferopt_roundtrip(name, metrics=None, **options)`` -> ``(report, loaded_model)``."""

    def run(name: str, metrics: list[str] | None = None, **options: Any) -> tuple[Any, Any]:
        import torch

        import inferopt
        from inferopt._recipe import Spec

        spec = str(Spec(name, dict(options)))
        out = tmp_path / f"roundtrip-{name}"
        report = inferopt.run(model=tiny_model_factory(), data=tiny_data, optimize=[spec],
                              metrics=metrics or ["fidelity", "size"], out=out)
        loaded = inferopt.load(out, model=tiny_model_factory())
        again = inferopt.apply(tiny_model_factory(), name, data=tiny_data, **options)
        with torch.inference_mode():
            for batch in tiny_data.eval:
                a, b = loaded(batch.inputs), again(batch.inputs)
                assert torch.allclose(a.float(), b.float(), atol=1e-5), (
                    f"{name}: the model rebuilt by inferopt.load differs from a fresh apply")
        return report, loaded

    return run
