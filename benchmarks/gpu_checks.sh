#!/usr/bin/env bash
# Every check that needs CUDA, in one go on one GPU (run on an H100/H200 from the repo root):
#   the gsplat CUDA parity tests (`pytest -m gpu`), then the GPU benchmarks
#   (benchmarks/gsplat_render.py: JAX vs torch CPU vs gsplat CUDA on a saved avatar;
#    benchmarks/render.py: our JAX rasteriser vs gsplat's kernels on the same scenes).
#
#   bash benchmarks/gpu_checks.sh [RESULTS_DIR]     # default benchmarks/results
#
# Needs torch with CUDA, gsplat 1.5.3 and this package's Python deps; gsplat's kernels are
# JIT-built on first use for TORCH_CUDA_ARCH_LIST (default 9.0, Hopper) and the time is printed.
set -uo pipefail
RESULTS=${1:-benchmarks/results}
mkdir -p "$RESULTS"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export XLA_PYTHON_CLIENT_PREALLOCATE=false FICA_XLA_CACHE=off PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, torch, flax; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| torch', torch.__version__)"
t0=$(date +%s)
python3 -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat kernels did not build'" || exit 1
echo "gsplat kernels built/loaded in $(($(date +%s) - t0)) s"
python3 -m pytest -m gpu -rA -s -p no:cacheprovider tests/render/test_render_raster.py tests/export/test_torch_runtime.py
status=$?
python3 benchmarks/gsplat_render.py --uv 64 --size 512 --frames 10 --out "$RESULTS/gsplat_render_cuda.json"
python3 benchmarks/render.py --sizes 512,1024 --counts 10000,100000,260000 --upm 128@512,256@1024 \
  --repeats 5 --old-limit 5e7 --out "$RESULTS/render_gpu.json"
exit $status
