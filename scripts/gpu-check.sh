#!/usr/bin/env bash
# Every CUDA test and benchmark in one go, for a machine with an NVIDIA GPU.
#   scripts/gpu-check.sh            (from the repository root)
# Creates .venv-gpu (a CUDA build of torch from the package index, or the one already there),
# runs the cuda-marked tests, then the benchmarks that have a CUDA mode. Output goes to stdout
# and, when $OUT is set (the device tool), to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-.}/gpu-check.log"
exec > >(tee "$log") 2>&1
nvidia-smi || { echo "no NVIDIA GPU visible"; exit 2; }
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q ".[test]" || exit 2
fi
. .venv-gpu/bin/activate
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
python -m pytest -m cuda -v -rs || status=$?
for bench in benchmarks/bench_*.py; do
  if grep -q -- "--device" "$bench"; then
    echo "== $bench --device cuda"
    python "$bench" --device cuda || status=$?
  fi
done
exit $status
