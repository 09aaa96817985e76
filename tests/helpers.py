"""Helpers shared by the tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m inferopt ARGS`` in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "inferopt", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_plugin_dist(
    root: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """Write modules and a ``DIST-VERSION.dist-info`` with ``inferopt`` entry points under
    ``root``; putting ``root`` on PYTHONPATH installs the plugin as pip would."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[inferopt]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


def load_json(text: str) -> Any:
    return json.loads(text)


SMALL = ["--model", "demo:digits-mlp-small", "--metric", "accuracy", "--metric", "fidelity",
         "--metric", "size", "--metric", "latency:min_runs=5,min_seconds=0,warmup=1"]


def demo_correct(model: Any, batch_size: int = 64) -> int:
    """Correct top-1 predictions of ``model`` on the held-out demo digits, batched like a run
    with the default batch size (dynamic activation scales depend on the batch)."""
    import torch

    from inferopt.plugins.sources.demo import digits_split

    _xt, _yt, x, y = digits_split()
    with torch.inference_mode():
        return sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                   for i in range(0, len(y), batch_size))


def sh(*args: str, cwd: Path | None = None, pythonpath: Path | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run a command with PYTHONPATH extended by ``pythonpath``; output captured as text."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def pip_install(package: Path, target: Path) -> None:
    """A real install: pip builds the wheel and writes the dist-info with its entry points.
    --target keeps it out of the test environment; deleting the folder uninstalls it. The
    sources are copied first, because building writes build/ next to them."""
    import shutil

    source = target.parent / f"src-{package.name}"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns(
        "__pycache__", "build", "*.egg-info"))
    result = sh(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                "--no-build-isolation", "--target", str(target), str(source))
    assert result.returncode == 0, result.stderr


def tiny_gpt2(layers: int = 2, outliers: bool = True) -> Any:
    """A randomly initialised GPT-2 (transformers' ``Conv1D`` layers, lm_head tied to the token
    embedding) returning logits; with ``outliers`` a few hidden channels of every LayerNorm are
    scaled x50, as trained LayerNorms produce."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    lm = GPT2LMHeadModel(config).eval()
    if outliers:
        with torch.no_grad():
            for block in lm.transformer.h:
                block.ln_1.weight[:3] *= 50.0
                block.ln_2.weight[:3] *= 50.0

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids).logits

    return Logits().eval()


# A third-party optimizer whose step calls sys.exit(0) (install it with the plugin_env fixture:
# plugin_env("inferopt-quits", {"quits": "quits_plugin"}, {"quits_plugin": QUITS_PLUGIN})).
QUITS_PLUGIN = """
import sys
import attrs
import inferopt


@attrs.frozen
class Quits(inferopt.Optimizer):
    name = "quits"

    def apply(self, model, ctx):
        sys.exit(0)


@inferopt.hookimpl
def inferopt_register_optimizers(register):
    register(Quits)
"""
