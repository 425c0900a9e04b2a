#!/usr/bin/env bash
# LongGen training launcher: sbatch-able on SLURM, a single-node run that starts torchrun
# itself, or one rank of your own torchrun.
#
#   sbatch --nodes=4 launch/pretrain_longgen.sh --config launch/configs/llama2_7b_128k_longgen.yaml \
#          --data-path /data/longdocs_text_document --load /ckpt/llama2-7b-mcore --finetune --save /ckpt/longgen-7b
#   bash launch/pretrain_longgen.sh --config launch/configs/tiny_cpu.yaml          # one node
#   torchrun --nproc-per-node 8 --no-python launch/pretrain_longgen.sh --config ...  # your torchrun
#
# Under torchrun (it sets TORCHELASTIC_RUN_ID) the script is one rank: it runs the trainer
# directly instead of starting a second torchrun.
# Environment: NPROC_PER_NODE (default: GPUs on the node, or 2 without GPUs), MASTER_PORT
# (default 29500), PYTHON (default python3).
#SBATCH --job-name=longgen
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=longgen-%j.out
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/pretrain_longgen.py" ]]; then
  REPO=${SLURM_SUBMIT_DIR}  # sbatch runs a copy of this script from a spool directory
fi
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP/SP comm overlap ordering

if [[ -n "${TORCHELASTIC_RUN_ID:-}" ]]; then  # already one rank of a torchrun job
  exec "${PYTHON}" "${REPO}/pretrain_longgen.py" "$@"
fi

MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then NPROC_PER_NODE=${SLURM_GPUS_ON_NODE}
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  else NPROC_PER_NODE=2
  fi
fi

if [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NNODES:-1}" -gt 1 ]]; then
  MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
  echo "launching on ${SLURM_NNODES} nodes x ${NPROC_PER_NODE} processes, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "${PYTHON}" -m torch.distributed.run \
      --nnodes="${SLURM_NNODES}" --nproc-per-node="${NPROC_PER_NODE}" \
      --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id="${SLURM_JOB_ID}" \
      "${REPO}/pretrain_longgen.py" "$@"
else
  echo "launching on one node x ${NPROC_PER_NODE} processes"
  exec "${PYTHON}" -m torch.distributed.run --standalone --nproc-per-node="${NPROC_PER_NODE}" \
    "${REPO}/pretrain_longgen.py" "$@"
fi
