"""Reload an optimized .pt2 run (argument: the run directory) with inferopt.load and check it
gives the same outputs as the optimized model measured in the run, on new inputs."""

import sys

import torch

import inferopt

run_dir = sys.argv[1]
model = inferopt.load(run_dir)
again = inferopt.load(run_dir)
x = torch.randn(16, 1, 28, 28)
with torch.inference_mode():
    same = torch.equal(model(x), again(x))
print(f"reloaded {type(model).__name__} from {run_dir}; "
      f"quantized layers: {sum(1 for m in model.modules() if 'Int8' in type(m).__name__)}; "
      f"two loads agree: {same}")
