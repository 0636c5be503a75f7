#!/usr/bin/env bash
# Run an fgcmr stage (or any Python script) on this machine with N processes, via the deepspeed launcher.
#
#   launchers/deepspeed.sh [-n NPROC] <fgcmr command and options>   e.g. -n 2 train --config=exp.yaml
#   launchers/deepspeed.sh [-n NPROC] script.py [args]
#
# NPROC defaults to the number of visible GPUs, or 2 on a CPU-only machine. On CPU the deepspeed
# launcher starts one process unless given --num_gpus and does not limit threads, so both are set
# here (OMP_NUM_THREADS = cores / NPROC unless already set). It appends --local_rank to the
# program's arguments unless told not to; fgcmr reads LOCAL_RANK from the environment instead.
# MASTER_PORT defaults to a free port.
#
# Several nodes: a DeepSpeed hostfile (one line per node, `<host> slots=<ranks>`; NPROC caps the
# slots used per node), and MASTER_ADDR = the first host. Run this on every node with its NODE_RANK
# (0 = the hostfile's first line; no ssh needed, like torchrun's multi-node form):
#   HOSTFILE=hosts NODE_RANK=<i> MASTER_ADDR=<node0> launchers/deepspeed.sh -n 8 train --config=exp.yaml
# Without NODE_RANK, DeepSpeed itself starts every node's ranks over passwordless ssh (pdsh) from
# this one. MASTER_PORT then defaults to 29500 (every node must use the same). Under Slurm, use
# `fgcmr submit` (srun starts the ranks) instead.
set -euo pipefail
here=$(dirname "$0")
. "$here/common.sh"
parse_args "$@"

[[ ${TARGET[0]} == -m ]] && TARGET=(--module "${TARGET[1]}")
if [[ -n ${HOSTFILE:-} ]]; then
    [[ -f $HOSTFILE ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE not found" >&2; exit 2; }
    nodes=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host of $HOSTFILE}")
    [[ -n ${NODE_RANK:-} ]] && nodes+=(--no_ssh --node_rank "$NODE_RANK")
    port=${MASTER_PORT:-29500}
else
    nodes=()
    port=${MASTER_PORT:-$(free_port)}
fi
run_keeping_requeue "$PYTHON" -m deepspeed.launcher.runner "${nodes[@]}" --num_gpus "$NPROC" --master_port "$port" \
    --no_local_rank "${TARGET[@]}" "${ARGS[@]}"
