#!/usr/bin/env bash
# Every CUDA test and benchmark in one go, on a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh            (from the repository root)
#
# It uses the machine's own python3 and torch (a CUDA build), installing inferopt into it
# without dependencies. GPU machines without a network need the pure-Python dependencies the
# image lacks as wheels in .whl/, fetched beforehand on a machine with one, for example:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl structlog
# Output goes to stdout and, when $OUT is set (the device tool), to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-.}/gpu-check.log"
exec > >(tee "$log") 2>&1
PY="${PYTHON:-python3}"
nvidia-smi || { echo "no NVIDIA GPU visible"; exit 2; }
for dep in structlog pluggy attrs click rich safetensors sklearn; do
  if ! "$PY" -c "import $dep" 2>/dev/null; then
    wheel=$(ls .whl/"${dep}"-*.whl 2>/dev/null | head -n 1)
    [ -n "$wheel" ] || { echo "missing Python package $dep and no wheel in .whl/"; exit 2; }
    "$PY" -m pip install --quiet --no-deps "$wheel" || exit 2
  fi
done
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || exit 2
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
"$PY" -m pytest -m cuda -v -rs -p no:cacheprovider || status=$?
# torchrun on NCCL with the one GPU: data-parallel and a one-stage pipeline, end to end
for backend in data-parallel:device_type=cuda model-parallel:device_type=cuda; do
  echo "== torchrun --nproc-per-node 1 --backend $backend"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m inferopt run \
      --model demo:digits-mlp-small -O none --backend "$backend" --metric accuracy \
      --metric latency --out "$(mktemp -d)/run" || status=$?
done
for bench in benchmarks/bench_*.py; do
  if grep -q -- '"--device"' "$bench"; then
    echo "== $bench --device cuda"
    "$PY" "$bench" --device cuda || status=$?
  fi
done
exit $status
