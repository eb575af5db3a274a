#!/usr/bin/env bash
# One torchrun per node; run this script on every node with the same MASTER_ADDR/MASTER_PORT.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=4 launch/multinode.sh --config launch/configs/imagenet_resnet50.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=4 launch/multinode.sh --config launch/configs/imagenet_resnet50.yaml
#
# Environment: NNODES (default 1), NODE_RANK (default 0), MASTER_ADDR (required when NNODES > 1),
# MASTER_PORT (default 29500), NPROC_PER_NODE (default: the number of GPUs, else 1).
# Every other argument goes to launch/train.py unchanged.
#
# ELASTIC=1: one `python -m lookahead_dist.elastic` supervisor per node instead of torchrun (node 0
# hosts the store on MASTER_ADDR:MASTER_PORT) and elastic.enabled=true: a lost worker leaves the
# others to go on; it is restarted up to MAX_RESTARTS times (default 3) and rejoins (docs/ELASTIC.md).
#   ELASTIC=1 NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=4 launch/multinode.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
  [[ "${NPROC_PER_NODE}" -ge 1 ]] 2>/dev/null || NPROC_PER_NODE=1
fi
if [[ "${NNODES}" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
  echo "multinode.sh: set MASTER_ADDR to the address of node 0 (NNODES=${NNODES})" >&2
  exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"

if [[ "${ELASTIC:-0}" == 1 ]]; then
  exec "${PYTHON:-python}" -m lookahead_dist.elastic \
    --nnodes="${NNODES}" \
    --node_rank="${NODE_RANK}" \
    --nproc_per_node="${NPROC_PER_NODE}" \
    --master_addr="${MASTER_ADDR}" \
    --master_port="${MASTER_PORT}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    "${here}/train.py" "$@" --set elastic.enabled=true
fi

exec "${TORCHRUN:-torchrun}" \
  --nnodes="${NNODES}" \
  --node_rank="${NODE_RANK}" \
  --nproc_per_node="${NPROC_PER_NODE}" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
  --rdzv_id="${RDZV_ID:-lookahead_dist}" \
  "${here}/train.py" "$@"
