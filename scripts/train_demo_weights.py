"""Train the demo models and write the weights that ship inside the package.

    python scripts/train_demo_weights.py            # every demo model
    python scripts/train_demo_weights.py digits-mlp-small

Uses the demo source's own recipe (``train_demo_model``: same seed, same 80/20 split, same
epochs and optimizer), so the shipped weights are what ``demo:NAME:retrain=true`` trains.
Writes ``src/inferopt/plugins/sources/demo_weights/NAME-vN.safetensors`` and prints the held-out
top-1 accuracy, which docs/performance.md and the README quote. Rerun it, and bump the version
in ``MODELS``, whenever the recipe changes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from inferopt.plugins.sources.demo import MODELS, digits_split, train_demo_model, weights_file

OUT = Path(__file__).resolve().parent.parent / "src/inferopt/plugins/sources/demo_weights"


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        sys.exit(f"unknown demo model(s) {unknown}; available: {', '.join(MODELS)}")
    OUT.mkdir(exist_ok=True)
    _x, _y, x_test, y_test = digits_split()
    for name in names or list(MODELS):
        start = time.perf_counter()
        model = train_demo_model(name).eval()
        seconds = time.perf_counter() - start
        with torch.inference_mode():
            correct = int((model(x_test).argmax(-1) == y_test).sum())
        path = OUT / weights_file(name)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata={"recipe": "inferopt.plugins.sources.demo.train_demo_model",
                            "torch": torch.__version__})
        path.chmod(0o644)  # safetensors writes 0600; installed package data must be readable
        print(f"{name}: trained in {seconds:.0f} s; held-out top-1 {correct}/{len(y_test)} = "
              f"{100 * correct / len(y_test):.2f}%; wrote {path} "
              f"({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
