#!/usr/bin/env bash
# Two CPU processes on loopback, one fake device each: the multi-host code path on one machine.
#   launch/local_two_process.sh /tmp/fica_two_proc
set -euo pipefail
WORKDIR=${1:-/tmp/fica_two_proc}
PORT=${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1
export FICA_COORDINATOR=127.0.0.1:${PORT} FICA_NUM_PROCESSES=2 PYTHONPATH=${PWD}${PYTHONPATH:+:${PYTHONPATH}}
pids=()
for id in 0 1; do
  FICA_PROCESS_ID=${id} python -m fica_jax.commands.train train toy --config configs/toy.py \
    --workdir "${WORKDIR}" --config.train.steps=20 --config.train.ckpt_every=10 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "${pid}"; done
echo "checkpoints: $(ls "${WORKDIR}/checkpoints")"
