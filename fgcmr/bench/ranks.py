"""Benchmarks re-run their own command on N local ranks (torchrun's variables); rank 0's output is theirs."""

from __future__ import annotations

import os
import subprocess
import sys

from fgcmr.distributed import free_port


def relaunch(command: str, nproc: int, **extra_env: str) -> int:
    """``fgcmr bench <command> <same args>`` on ``nproc`` ranks; the worst exit code."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            **extra_env,
        )
        cmd = [sys.executable, "-m", "fgcmr", "bench", command, *sys.argv[3:]]
        procs.append(subprocess.Popen(cmd, env=env, stdout=None if rank == 0 else subprocess.DEVNULL))
    return max(p.wait() for p in procs)
