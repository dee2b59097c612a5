#!/usr/bin/env bash
# Submits `fica train` as a GKE workload with xpk (https://github.com/AI-Hypercomputer/xpk).
#
#   CLUSTER=my-cluster WORKLOAD=dit-paper-001 TPU_TYPE=v5p-128 NUM_SLICES=1 \
#   IMAGE=us-docker.pkg.dev/my-proj/fica/fica-jax:latest \
#   WORKDIR=gs://my-bucket/runs/dit-paper launch/xpk_workload.sh
#
# IMAGE is a container with this repository installed (`pip install -e .`). xpk's JobSet sets the
# TPU_WORKER_* (and, for several slices, MEGASCALE_*) variables JAX's cluster detection reads.
# For GPUs use `--device-type=h100-80gb-8` instead of `--tpu-type`.
set -euo pipefail
: "${CLUSTER:?set CLUSTER}" "${WORKLOAD:?set WORKLOAD}" "${IMAGE:?set IMAGE}" "${WORKDIR:?set WORKDIR}"
TPU_TYPE=${TPU_TYPE:-v5p-128}
NUM_SLICES=${NUM_SLICES:-1}
STAGE=${STAGE:-dit}
CONFIG=${CONFIG:-configs/dit.py:paper}
MESH=${MESH:-"--config.mesh.data=${NUM_SLICES} --config.mesh.fsdp=-1"}
EXTRA=${EXTRA:-}
ZONE_FLAG=${ZONE:+--zone=${ZONE}}
PROJECT_FLAG=${PROJECT:+--project=${PROJECT}}

# shellcheck disable=SC2086
xpk workload create \
  --cluster="${CLUSTER}" ${ZONE_FLAG} ${PROJECT_FLAG} \
  --workload="${WORKLOAD}" \
  --tpu-type="${TPU_TYPE}" \
  --num-slices="${NUM_SLICES}" \
  --docker-image="${IMAGE}" \
  --max-restarts=10 \
  --command="FICA_DISTRIBUTED=auto python -m fica_jax.commands.main train ${STAGE} --config ${CONFIG} \
--workdir ${WORKDIR} ${MESH} ${EXTRA}"
# A restarted pod re-runs the same command and resumes from WORKDIR's newest checkpoint.
