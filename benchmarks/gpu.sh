#!/usr/bin/env bash
# The GPU figures in one prepared run (< 5 minutes on the lent H200): hardware and versions, then
# benchmarks/gpu_bench.py (training and inference throughput at N=64/128 for batch sizes 16-1024,
# device-resident inference and the TF32-vs-float32 precision check, fit with the data sharded over
# every visible device, refinement passes/s on a 512-position scan). Results go to $OUT (the device
# tool's output folder) or benchmarks/results/gpu. The image's python3 holds jax with CUDA, flax,
# optax, orbax, h5py, scipy, matplotlib and tqdm: the project runs from the checkout (PYTHONPATH).
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
#   BUDGET_S=120 bash benchmarks/gpu.sh
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import sys, jax, jaxlib, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$out/hardware.txt"
"$py" benchmarks/gpu_bench.py --out "$out/gpu.json" --budget-s "${BUDGET_S:-270}" "$@" 2>&1 | tee "$out/gpu_bench.log"
