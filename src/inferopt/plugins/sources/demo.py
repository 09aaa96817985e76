"""The demo: a real classifier trained on a small real dataset, so that ``inferopt run`` with no
arguments does something useful within a minute and offline.

The dataset is the UCI optical-recognition 8x8 handwritten digits (1,797 images, 10 classes), as
bundled with scikit-learn; no download is needed. ``demo:digits-mlp`` is a 64-1024-1024-10 MLP,
wide enough for optimizations to show on a CPU, trained on a fixed 80/20 split.
``demo:digits`` is the held-out 20% for evaluation, with the training 80% as calibration data.

The trained weights ship inside the package (``demo_weights/NAME-vN.safetensors``, written by
``scripts/train_demo_weights.py`` with :func:`train_demo_model`, the recipe below), so a user's
machine never trains them. Where those files are missing, or with ``demo:NAME:retrain=true``,
the model is trained here and cached (``$INFEROPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/inferopt``,
else ``~/.cache/inferopt``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from inferopt import Data, DataSource, ModelSource, UsageError, hookimpl, option
from inferopt.utils import build_options, parse_target_spec

MODELS = {
    # name: (hidden widths, epochs, cache version)
    "digits-mlp": ((1024, 1024), 40, 1),
    "digits-mlp-small": ((128,), 60, 1),
}
SPLIT_SEED = 0
TEST_FRACTION = 0.2
WEIGHTS_PACKAGE = "inferopt.plugins.sources"  # package data: demo_weights/*.safetensors


@attrs.frozen
class DemoSpec:
    """Options of a ``demo:`` model spec."""

    retrain: bool = option(False, help="train the model here (a few minutes on 2 cores) "
                                        "instead of loading the weights shipped with inferopt")


def weights_file(name: str) -> str:
    """File name of a demo model's weights, shipped or cached (the version changes with the
    recipe)."""
    return f"{name}-v{MODELS[name][2]}.safetensors"


def shipped_weights(name: str) -> Path | None:
    """The trained weights shipped inside the package, or None when they are not installed."""
    path = resources.files(WEIGHTS_PACKAGE) / "demo_weights" / weights_file(name)
    return Path(str(path)) if path.is_file() else None


def cache_dir() -> Path:
    if os.environ.get("INFEROPT_CACHE_DIR"):
        return Path(os.environ["INFEROPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferopt"


def digits_split() -> tuple[Any, Any, Any, Any]:
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, pixels scaled to [0, 1]."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy((bunch.data / 16.0).astype(np.float32))
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def build_mlp(hidden: tuple[int, ...], inputs: int = 64, classes: int = 10) -> Any:
    import torch

    layers: list[Any] = []
    width = inputs
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def train_classifier(model: Any, x: Any, y: Any, epochs: int, seed: int = 0) -> Any:
    """Adam with cosine decay, label smoothing, seeded: the same weights on every run."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = (len(y) + 63) // 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def train_demo_model(name: str) -> Any:
    """Build and train demo model ``name`` with its fixed recipe (seeded: the same weights on
    every run of the same torch build). The shipped weights are this function's output."""
    import torch

    hidden, epochs, _version = MODELS[name]
    torch.manual_seed(SPLIT_SEED)
    model = build_mlp(hidden)
    x_train, y_train, _x, _y = digits_split()
    threads = torch.get_num_threads()
    train_classifier(model, x_train, y_train, epochs)
    torch.set_num_threads(threads)
    return model


class DemoModels(ModelSource):
    """Demo models trained on the bundled digits dataset: ``demo:digits-mlp`` (default) and
    ``demo:digits-mlp-small``."""

    scheme = "demo"
    runs_code = False  # an MLP built here; the weights come from a safetensors file
    summary = "demo models trained on the 8x8 digits dataset (" + ", ".join(MODELS) + ")"

    def load(self, spec: str, ctx: Any) -> Any:
        import torch
        from safetensors.torch import load_file, save_file

        name, raw = parse_target_spec(spec, "demo", "--model")
        if name not in MODELS:
            raise UsageError(
                f"--model {spec!r}: unknown demo model; available: "
                + ", ".join(f"demo:{n}" for n in MODELS)
            )
        opts = build_options(DemoSpec, raw, f"--model {spec!r}")
        hidden, _epochs, _version = MODELS[name]
        torch.manual_seed(SPLIT_SEED)
        model = build_mlp(hidden)
        if ctx.restoring:  # the saved weights are loaded over these
            return model.eval()
        shipped = None if opts.retrain else shipped_weights(name)
        cached = cache_dir() / weights_file(name)
        for path in (shipped, None if opts.retrain else cached):
            if path is not None and path.is_file():
                try:
                    model.load_state_dict(load_file(str(path)))
                    return model.eval()
                except Exception as exc:  # a file cut short (a killed copy, a full disk)
                    if path == shipped:
                        raise UsageError(
                            f"--model {spec!r}: the demo weights shipped with inferopt "
                            f"({path}) cannot be read ({type(exc).__name__}); reinstall "
                            "inferopt, or add :retrain=true") from None
                    ctx.log.warning("the cached demo weights cannot be read; training again",
                                    path=str(path), error=f"{type(exc).__name__}: {exc}")
        ctx.log.info("training demo model (cached for next time)", model=name,
                     path=str(cached), retrain=opts.retrain)
        model = train_demo_model(name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(cached)
        return model.eval()

    def default_data(self, spec: str) -> str | None:
        return "demo:digits"


class DemoData(DataSource):
    """``demo:digits``: the held-out 20% of the digits dataset (359 images) with labels; the
    other 80% is the calibration/training split."""

    scheme = "demo"
    summary = "8x8 digits: held-out split for eval, training split for calibration"

    def load(self, spec: str, ctx: Any) -> Data:
        from inferopt.utils import split_tensors

        name = spec.partition(":")[2]
        if name != "digits":
            raise UsageError(f"--data {spec!r}: unknown demo dataset; available: demo:digits")
        x_train, y_train, x_test, y_test = digits_split()
        return Data(
            eval=split_tensors(x_test, y_test, ctx.batch_size),
            calibration=split_tensors(x_train, y_train, ctx.batch_size),
            description="8x8 digits (UCI), 359 held-out images; 1,438 for calibration",
        )


@hookimpl
def inferopt_register_models(register: Any) -> None:
    register(DemoModels)


@hookimpl
def inferopt_register_datasets(register: Any) -> None:
    register(DemoData)
