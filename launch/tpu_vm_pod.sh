#!/usr/bin/env bash
# Runs `fica train` on every worker of an existing Cloud TPU VM slice (e.g. v5p-128).
#
#   TPU_NAME=my-v5p ZONE=us-east5-a PROJECT=my-proj \
#   WORKDIR=gs://my-bucket/runs/dit-paper STAGE=dit CONFIG=configs/dit.py:paper \
#   MESH="--config.mesh.data=8 --config.mesh.fsdp=-1" launch/tpu_vm_pod.sh
#
# Assumes the repository is checked out at ~/fica-jax on every worker with its venv in .venv
# (e.g. via `gcloud compute tpus tpu-vm ssh ... --worker=all --command="git clone ... && ..."`).
# Re-running the same command resumes from the newest checkpoint in WORKDIR.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
PROJECT_FLAG=${PROJECT:+--project=${PROJECT}}
STAGE=${STAGE:-dit}
CONFIG=${CONFIG:-configs/dit.py:paper}
MESH=${MESH:-}
EXTRA=${EXTRA:-}
REPO_DIR=${REPO_DIR:-~/fica-jax}

CMD="cd ${REPO_DIR} && . .venv/bin/activate && FICA_DISTRIBUTED=auto \
python -m fica_jax.commands.main train ${STAGE} --config ${CONFIG} --workdir ${WORKDIR} ${MESH} ${EXTRA} \
2>&1 | tee -a /tmp/fica_train.log"

# shellcheck disable=SC2086
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG} \
  --worker=all --command="${CMD}"
