"""Benchmarks re-run their own command on N local ranks (``fgcmr.launch``'s); rank 0's output is theirs."""

from __future__ import annotations

import os
import subprocess
import sys

from fgcmr.launch import local_rank_envs, start_rank, supervise


def relaunch(command: str, nproc: int, **extra_env: str) -> int:
    """``fgcmr bench <command> <same args>`` on ``nproc`` ranks, supervised as ``fgcmr.launch`` does (a rank that
    fails stops the others, rather than leaving them in a collective); the job's exit code."""
    procs = []
    for rank, rank_env in enumerate(local_rank_envs(nproc)):
        env = dict(os.environ, **rank_env, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra_env)
        cmd = [sys.executable, "-m", "fgcmr", "bench", command, *sys.argv[3:]]
        procs.append(start_rank(cmd, env, stdout=None if rank == 0 else subprocess.DEVNULL))
    return supervise(procs)
