"""The experiment file's ``slurm:`` section: resources of each job in the submitted chain.

Top-level fields apply to every job; ``shard``, ``merge``, ``label``, ``infer``, ``train`` and
``eval`` override them for one job. The multi-rank jobs (label, infer, train, eval) run
``nodes × tasks_per_node`` ranks, one per GPU when ``gpus_per_node > 0``; shard array tasks and
the merge job run one task on one node each.
"""

from __future__ import annotations

import dataclasses
import re
import sys

from fgcmr.config import Validated
from fgcmr.stages import STAGES

TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")  # Slurm's [days-]hours[:minutes[:seconds]] or minutes
# The chain's jobs: each stage's Slurm job (fgcmr.stages), the shard array's merge job after the shard job.
JOBS = tuple(
    dict.fromkeys(j for s in STAGES for j in ((s.slurm_job, "merge") if s.slurm_job == "shard" else (s.slurm_job,)))
)


@dataclasses.dataclass
class JobResources:
    """Per-job overrides; ``None`` inherits the section's top-level value."""

    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    extra: list[str] = dataclasses.field(default_factory=list)  # appended to the section's extra lines


@dataclasses.dataclass
class Resolved:
    """One job's final resources."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    mem: str | None
    time: str
    partition: str | None
    extra: list[str]


@dataclasses.dataclass
class SlurmConfig(Validated):
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU jobs (gloo)
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 4  # also each rank's thread count and DataLoader budget
    mem: str | None = None  # e.g. "64G" per node; default: the partition's
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"  # every job's limit unless its own section sets one
    shard_tasks: int = 4  # array size of the shard job (each task writes every shard_tasks-th chunk)
    signal_seconds: int = 300  # USR1 this long before the train job's limit: checkpoint, requeue
    extra: list[str] = dataclasses.field(default_factory=list)  # extra #SBATCH options, e.g. "--constraint=a100"
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before each job (module load, venv)
    python: str = sys.executable  # interpreter on the compute nodes; default: the one running `fgcmr submit`
    logs: str | None = None  # log directory; default: <out>/slurm/logs
    scratch: str | None = None  # node-local dir (on every node) for the ranks' temp files (fgcmr --scratch)
    shard: JobResources = dataclasses.field(default_factory=JobResources)
    merge: JobResources = dataclasses.field(default_factory=JobResources)
    label: JobResources = dataclasses.field(default_factory=JobResources)
    infer: JobResources = dataclasses.field(default_factory=JobResources)
    train: JobResources = dataclasses.field(default_factory=JobResources)
    eval: JobResources = dataclasses.field(default_factory=JobResources)

    def validate(self) -> None:
        for name in ("nodes", "cpus_per_task", "shard_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.gpus_per_node < 0 or (self.tasks_per_node is not None and self.tasks_per_node < 1):
            raise ValueError("gpus_per_node must be ≥ 0 and tasks_per_node ≥ 1")
        if self.signal_seconds < 10:
            raise ValueError(f"signal_seconds={self.signal_seconds} leaves no time to checkpoint; use ≥ 10")
        for job in (None, *JOBS):
            time = self.time if job is None else getattr(self, job).time
            if time is not None and not TIME.match(time):
                raise ValueError(f"{job + '.' if job else ''}time={time!r} is not a Slurm time ([days-]hh[:mm[:ss]])")

    def resolve(self, job: str) -> Resolved:
        """This job's resources: its own section over the top-level values; single-task jobs forced so."""
        own = getattr(self, job)
        gpus = _first(own.gpus_per_node, self.gpus_per_node)
        single = job in ("shard", "merge")
        return Resolved(
            nodes=1 if single else _first(own.nodes, self.nodes),
            tasks_per_node=1 if single else _first(own.tasks_per_node, self.tasks_per_node, gpus or 1),
            gpus_per_node=(own.gpus_per_node or 0) if single else gpus,  # shard/merge need no GPU unless asked
            cpus_per_task=_first(own.cpus_per_task, self.cpus_per_task),
            mem=_first(own.mem, self.mem),
            time=_first(own.time, self.time),
            partition=_first(own.partition, self.partition),
            extra=[*self.extra, *own.extra],
        )


def _first(*values):
    return next((v for v in values if v is not None), None)
