#!/usr/bin/env bash
# Every check that needs CUDA, in one go on one GPU, in about 8 minutes (run on an H100/H200 from
# the repo root; each step prints its wall time, and each writes its own JSON, so a cut-off run
# keeps what finished):
#   1. gsplat's CUDA kernels built (JIT, ~80-100 s on 16 cores);
#   2. the gsplat parity tests (`pytest -m gpu`, JAX on CPU vs gsplat CUDA);
#   3. the compiled Triton compositing kernel = the XLA path, values and gradients, JAX on the GPU
#      (tests/render/test_render_kernels.py::test_cuda_kernel_equals_xla_path);
#   4. benchmarks/render.py at 512 px (10k and 100k random Gaussians, a 256^2 UPM map): every
#      path beside gsplat's CUDA `rasterization` -> render_gpu.json (the issue's figures);
#   5. benchmarks/gsplat_render.py: a saved avatar through JAX and through the exported runtime;
#   6. the larger rows (1024 px, 1M Gaussians, a 512^2 map; kernel paths only) -> render_gpu_large.json.
#
#   bash benchmarks/gpu_checks.sh [RESULTS_DIR]     # default benchmarks/results
#
# Needs torch with CUDA, gsplat 1.5.3, JAX with CUDA and this package's Python deps; gsplat's
# kernels are JIT-built on first use for TORCH_CUDA_ARCH_LIST (default 9.0, Hopper).
set -uo pipefail
RESULTS=${1:-benchmarks/results}
mkdir -p "$RESULTS"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export XLA_PYTHON_CLIENT_PREALLOCATE=false FICA_XLA_CACHE=off PYTHONUNBUFFERED=1
step() { echo "== $1 ($(($(date +%s) - T0)) s)"; }
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, torch, flax; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| torch', torch.__version__)"
step "1. gsplat kernels"
python3 -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat kernels did not build'" || exit 1
step "2. gsplat parity (JAX on CPU)"
python3 -m pytest -m gpu -rA -s -p no:cacheprovider tests/render/test_render_raster.py tests/export/test_torch_runtime.py
status=$?
step "3. Triton kernel = XLA path (JAX on the GPU)"
JAX_PLATFORMS=cuda python3 -m pytest -m gpu -rA -p no:cacheprovider tests/render/test_render_kernels.py || status=1
step "4. render benchmark, 512 px"
JAX_PLATFORMS=cuda python3 benchmarks/render.py --sizes 512 --counts 10000,100000 --upm 256@512 \
  --repeats 5 --max-call-s 15 --out "$RESULTS/render_gpu.json"
step "5. avatar through JAX and the exported runtime"
python3 benchmarks/gsplat_render.py --uv 64 --size 512 --frames 10 --out "$RESULTS/gsplat_render_cuda.json"
step "6. larger rows"
JAX_PLATFORMS=cuda timeout 150 python3 benchmarks/render.py --sizes 1024 --counts 1000000 \
  --upm 512@1024 --paths xla-parallel,pallas --repeats 3 --max-call-s 30 \
  --out "$RESULTS/render_gpu_large.json"
step "done"
exit $status
