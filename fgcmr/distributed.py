"""Where am I? Rank, world size and rendezvous from whichever launcher started this process.

Supported, in order of precedence: torchrun / the deepspeed launcher (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST``, a port derived from the job id), or a
plain single process. MPI is never needed. NCCL is chosen on CUDA and gloo on CPU; each rank is
pinned to its local GPU. Every stage calls ``init()`` once and passes the resulting ``DistEnv`` down.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from typing import Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("fgcmr.distributed")


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list (``node[01-04]`` → ``node01``), via ``scontrol`` when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30)
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def resolve_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; never touches torch.distributed."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(tasks_per_node.split("(")[0].split(",")[0] or 1),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv()


def export_env(d: DistEnv) -> None:
    """Publish the resolved topology in torchrun's variables, which DeepSpeed and torch read."""
    os.environ.update(
        RANK=str(d.rank),
        WORLD_SIZE=str(d.world_size),
        LOCAL_RANK=str(d.local_rank),
        LOCAL_WORLD_SIZE=str(d.local_world_size),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )


def init(threads: int | None = None) -> DistEnv:
    """Resolve the topology, pin the GPU, set thread counts and join the process group (if > 1 rank)."""
    d = resolve_env()
    export_env(d)
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, d.local_world_size))
    torch.set_num_threads(threads)
    if d.distributed and not dist.is_initialized():
        dist.init_process_group(backend=d.backend, rank=d.rank, world_size=d.world_size)
    if d.is_main:
        log.info(
            "topology: launcher=%s world=%d local_world=%d master=%s:%d backend=%s device=%s threads=%d",
            d.launcher, d.world_size, d.local_world_size, d.master_addr, d.master_port, d.backend, d.device.type, threads,
        )
    return d


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_slice(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's share of an ordered list, round-robin so ranks get near-equal counts."""
    return list(items[rank::world_size])


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients to every rank's input.

    ``dist.all_gather`` returns tensors detached from the graph; the autograd-aware
    ``torch.distributed.nn.functional.all_gather`` sends each rank the gradients of its own slice.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_gather_objects(obj: object) -> list:
    """Gather a picklable object from each rank, in rank order (no gradients)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
