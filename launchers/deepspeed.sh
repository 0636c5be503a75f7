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
# MASTER_PORT defaults to a free port. Several nodes: use a hostfile with deepspeed directly, or Slurm.
set -euo pipefail
here=$(dirname "$0")
. "$here/common.sh"
parse_args "$@"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
[[ ${TARGET[0]} == -m ]] && TARGET=(--module "${TARGET[1]}")
run_keeping_requeue "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${MASTER_PORT:-$(free_port)}" \
    --no_local_rank "${TARGET[@]}" "${ARGS[@]}"
