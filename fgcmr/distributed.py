"""Where am I? Rank, world size and rendezvous from whichever launcher started this process.

Supported, in order of precedence: torchrun / the deepspeed launcher (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), an ``srun`` step (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, the first host of the step's node list via
``scontrol show hostnames``, a port derived from the job and step ids), or a plain single process.
MPI is never needed. NCCL is chosen on CUDA and gloo on CPU; each rank is pinned to its local GPU
and given its share of the node's cores as threads. Every stage calls ``init()`` once and passes
the resulting ``DistEnv`` down.

Across nodes, every rank's data split and random streams follow its global ``rank``; ``local_rank``
only picks the GPU and the thread share. Shared outputs (checkpoints, sidecars, exports, metrics)
are written once, by the rank that owns them, to the output directories. ``--scratch`` (any stage;
``$FGCMR_SCRATCH``) puts each rank's temporary files on node-local disk instead (``use_scratch``).
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from fgcmr.config import ConfigError
from fgcmr.launch import cores_per_rank, rank_variables
from fgcmr.progress import setup_logging

log = logging.getLogger("fgcmr.distributed")
TIMEOUT_ENV = "FGCMR_COLLECTIVE_TIMEOUT"  # seconds a collective may wait for the other ranks (default 900)
SCRATCH_ENV = "FGCMR_SCRATCH"  # set by the CLI's --scratch, by `fgcmr submit` (slurm.scratch), or by hand
UNIX_PATH_MAX = 107  # bytes of a Unix socket path (sun_path, less its NUL)


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"
    cpus: int | None = None  # CPUs given to this rank by the launcher (Slurm's --cpus-per-task), if known

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """This rank's GPU; ``local_rank`` modulo the visible count, as Slurm may expose one GPU per task."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list (``node[01-04]`` → ``node01``), via ``scontrol`` when present."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        )
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist).group(0)
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + re.split(r"[-,\]]", rest)[0]
    return head


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's task count from Slurm's compressed ``SLURM_*TASKS_PER_NODE`` (``2(x3),1``)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse Slurm tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """A rendezvous port every rank of a Slurm step derives alike, distinct for concurrent jobs and steps.

    Kept in 10000–31999, below Linux's ephemeral range (32768+), so an outgoing connection on the
    first node cannot already hold it. Jobs 5,500 ids apart share a port only if they share a node too.
    """
    return 10000 + (job_id * 4 + step_id % 4) % 22000


def resolve_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; never touches torch.distributed.

    torchrun / the deepspeed launcher win over Slurm (``srun torchrun ...`` is a valid way to
    launch). Slurm is used only inside an ``srun`` step: a batch script's own shell also carries
    ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N``, but it is one process, and joining a group of N there
    would hang; it resolves as a single process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local_size = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env["WORLD_SIZE"]
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(local_size),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="deepspeed" if "LOCAL_SIZE" in env and "LOCAL_WORLD_SIZE" not in env else "torchrun",
            cpus=_int(env.get("SLURM_CPUS_PER_TASK")),
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        job_id = int(env.get("SLURM_JOB_ID") or 0)
        step_id = int(env.get("SLURM_STEP_ID") or 0)
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        )
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=tasks_on_node(per_node, int(env.get("SLURM_NODEID", 0))),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or slurm_port(job_id, step_id)),
            launcher="slurm",
            cpus=_int(env.get("SLURM_CPUS_PER_TASK")),
        )
    if int(env.get("SLURM_NTASKS") or 1) > 1:
        log.warning(
            "SLURM_NTASKS=%s but this process was not started by srun: running as a single process", env["SLURM_NTASKS"]
        )
    # a lone process keeps a port chosen for it (``init_distributed``: parallel single runs must not collide)
    return DistEnv(master_port=int(env.get("MASTER_PORT") or 29500), cpus=_int(env.get("SLURM_CPUS_PER_TASK")))


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def rank_env(d: DistEnv) -> dict[str, str]:
    """``d`` in torchrun's variables (which ``resolve_env`` reads back)."""
    return rank_variables(d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port)


def export_env(d: DistEnv) -> None:
    """Publish the resolved topology in torchrun's variables."""
    os.environ.update(rank_env(d))


def thread_count(d: DistEnv, environ: Mapping[str, str] | None = None) -> int:
    """Intra-op threads per rank: Slurm's CPUs per task, else a launcher's ``OMP_NUM_THREADS``,
    else the cores per rank on this node."""
    env = os.environ if environ is None else environ
    if d.cpus:
        return d.cpus
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    return cores_per_rank(d.local_world_size)


def collective_timeout(environ: Mapping[str, str] | None = None) -> datetime.timedelta:
    """How long a collective waits for the other ranks before failing (``$FGCMR_COLLECTIVE_TIMEOUT`` seconds,
    default 15 min: longer than any rank-0-only step such as tokenizer training or a checkpoint save, far
    shorter than gloo's 30 min). A rank that dies closes its connections, so the others fail sooner."""
    env = os.environ if environ is None else environ
    return datetime.timedelta(seconds=float(env.get(TIMEOUT_ENV) or 900))


def init(threads: int | None = None, *, group_of_one: bool = False) -> DistEnv:
    """Resolve the topology, pin the GPU, set thread counts and join the process group (if > 1 rank, or
    ``group_of_one`` for a lone process, which DeepSpeed needs).

    A lone process's group lives in an in-memory store, not on ``MASTER_PORT``: it binds no port, so
    parallel single runs cannot collide, and a process that runs a stage in-process and then starts others
    (which inherit the variables ``export_env`` published) hands them no port that it holds.
    """
    d = resolve_env()
    export_env(d)
    setup_logging(d.rank)  # the CLI set up rank 0's format before the rank was known
    use_scratch(d.rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(d.device)
    threads = threads or thread_count(d)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for worker processes started later
    if d.distributed and not dist.is_initialized():
        dist.init_process_group(backend=d.backend, rank=d.rank, world_size=d.world_size, timeout=collective_timeout())
    elif group_of_one and not dist.is_initialized():
        dist.init_process_group(
            backend=d.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=collective_timeout()
        )
    atexit.register(_leave_process_group)
    if d.is_main:
        log.info(
            "topology: launcher=%s world=%d local_world=%d master=%s:%d backend=%s device=%s threads=%d",
            d.launcher,
            d.world_size,
            d.local_world_size,
            d.master_addr,
            d.master_port,
            d.backend,
            d.device.type,
            threads,
        )
    return d


def use_scratch(rank: int) -> Path | None:
    """Put this rank's temporary files under ``$FGCMR_SCRATCH`` (node-local disk), removed at exit.

    A fresh ``<scratch>/fgcmr-rank<r>-*`` becomes ``TMPDIR`` (Python's ``tempfile``, DataLoader and
    library temp files), and ``<scratch>/cache`` holds compiler caches (TorchInductor, Triton: by default
    in ``$HOME``, which a cluster shares between nodes) unless they are set already. Unset: nothing
    changes. Outputs never go there: they are written to the shared output directories.
    """
    root = os.environ.get(SCRATCH_ENV)
    if not root:
        return None
    current = os.environ.get("TMPDIR", "")
    if Path(current).parent == Path(root) and Path(current).name.startswith(f"fgcmr-rank{rank}-"):
        return Path(current)  # init() ran before in this process
    absolute = str(Path(root).absolute())
    extra = len(f"/fgcmr-rank{rank}-12345678/pymp-12345678/listener-12345678")
    if len(absolute) + extra > UNIX_PATH_MAX:  # multiprocessing (DataLoader workers) makes its Unix sockets in TMPDIR
        raise ConfigError(
            f"--scratch={root} is too long for the Unix sockets DataLoader workers make under it; "
            f"use a path of at most {UNIX_PATH_MAX - extra} characters"
        )
    Path(root).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"fgcmr-rank{rank}-", dir=root))
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # re-read TMPDIR on next use
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ.setdefault(var, str(Path(root) / "cache" / sub))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    log.info("rank %d: temporary files in %s", rank, path)
    return path


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does: gloo's threads, left to static
    destructors, can abort the process at exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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

    with warnings.catch_warnings():  # deprecated in favour of a functional collective without autograd on gloo
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def all_gather_objects(obj: object) -> list:
    """Gather a picklable object from each rank, in rank order (no gradients)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
