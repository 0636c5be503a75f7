#!/usr/bin/env bash
# Run an fgcmr stage (or any Python script) on this machine with N processes, via torchrun.
#
#   launchers/torchrun.sh [-n NPROC] <fgcmr command and options>    e.g. -n 2 train --config=exp.yaml
#   launchers/torchrun.sh [-n NPROC] script.py [args]
#
# NPROC defaults to the number of visible GPUs, or 2 on a CPU-only machine (gloo). torchrun sets
# RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; fgcmr.distributed reads them. One node uses a standalone
# rendezvous on a free port; for several nodes run this on each with NNODES=<n>, NODE_RANK=<i>,
# MASTER_ADDR=<first node> (and optionally MASTER_PORT, default 29500).
# PYTHON selects the interpreter (default: python).
set -euo pipefail
here=$(dirname "$0")
. "$here/common.sh"
parse_args "$@"

if (( ${NNODES:-1} > 1 )); then
    rdzv=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --rdzv-backend c10d
          --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-fgcmr}")
else
    rdzv=(--standalone)
fi
run_keeping_requeue "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" "${TARGET[@]}" "${ARGS[@]}"
