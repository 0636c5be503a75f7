"""An experiment → the chain of Slurm jobs that runs it, and each job's sbatch script.

The chain is shard (a job array) → merge → label → infer → train → eval, each job depending on the
one before with ``afterok``; a job is left out when the experiment has no section for its stage.
Scripts are the templates in ``fgcmr/slurm/templates/`` (``slurm/`` at the repository root) with
``{{name}}`` placeholders filled from the ``slurm:`` section; every job calls the same ``fgcmr``
commands as a local run, under ``srun``, each rank resolving itself through ``fgcmr.distributed``.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

from fgcmr.run import EXIT_REQUEUE
from fgcmr.slurm.config import Resolved, SlurmConfig
from fgcmr.stages import STAGES

TEMPLATES = Path(__file__).resolve().parent / "templates"  # package data: ships in the wheel
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
__all__ = ["EXIT_REQUEUE", "Job", "plan", "render"]


@dataclasses.dataclass
class Job:
    name: str  # also the template's file name (<name>.sbatch) and the log's prefix
    resources: Resolved
    values: dict[str, str]  # template values of this job, beyond the common ones
    array: int | None = None  # number of array tasks
    requeue: bool = False

    def stages(self, experiment: dict) -> list[str]:
        """The pipeline stages this job runs (``fgcmr.stages``; the merge job finishes the shard stage)."""
        job = "shard" if self.name == "merge" else self.name
        return [s.name for s in STAGES if s.slurm_job == job and s.name in experiment]

    def log_pattern(self, logs: Path) -> str:
        return str(logs / (f"{self.name}-%A_%a.out" if self.array else f"{self.name}-%j.out"))


def plan(experiment: dict, cfg: SlurmConfig) -> list[Job]:
    """The jobs for the stages the experiment configures, in dependency order."""
    has = experiment.__contains__
    jobs = []
    if has("shard"):
        jobs.append(Job("shard", cfg.resolve("shard"), {"num_tasks": str(cfg.shard_tasks)}, array=cfg.shard_tasks))
        jobs.append(Job("merge", cfg.resolve("merge"), {"num_tasks": str(cfg.shard_tasks)}))
    if has("label"):
        jobs.append(Job("label", cfg.resolve("label"), {"with_tokenizer": _bool(has("tokenizer"))}))
    if has("infer"):
        jobs.append(Job("infer", cfg.resolve("infer"), {}))
    if has("train"):
        values = {"signal_seconds": str(cfg.signal_seconds), "requeue_code": str(EXIT_REQUEUE)}
        jobs.append(Job("train", cfg.resolve("train"), values, requeue=True))
    if has("eval"):
        jobs.append(Job("eval", cfg.resolve("eval"), {"with_export": _bool(has("export"))}))
    return jobs


def _bool(value: bool) -> str:
    return "true" if value else "false"


def header(job: Job, cfg: SlurmConfig, name: str, logs: Path) -> str:
    """The ``#SBATCH`` lines of one job."""
    r = job.resources
    opts = [
        f"--job-name={name}-{job.name}",
        f"--output={job.log_pattern(logs)}",
        "--open-mode=append",  # a requeued job continues its log
        f"--nodes={r.nodes}",
        f"--ntasks-per-node={r.tasks_per_node}",
        f"--cpus-per-task={r.cpus_per_task}",
        f"--time={r.time}",
    ]
    opts += [f"--gpus-per-node={r.gpus_per_node}"] if r.gpus_per_node else []
    opts += [
        f"--{k}={v}"
        for k, v in (("partition", r.partition), ("account", cfg.account), ("qos", cfg.qos), ("mem", r.mem))
        if v
    ]
    opts += [f"--array=0-{job.array - 1}"] if job.array else []
    opts += ["--requeue", f"--signal=B:USR1@{cfg.signal_seconds}"] if job.requeue else []
    lines = [f"#SBATCH {o}" for o in opts]
    lines += [e if e.startswith("#SBATCH") else f"#SBATCH {e}" for e in r.extra]
    return "\n".join(lines)


def render(job: Job, cfg: SlurmConfig, name: str, config: Path, workdir: Path, logs: Path) -> str:
    """One job's complete sbatch script."""
    common = {
        "config": shlex.quote(str(config)),
        "workdir": shlex.quote(str(workdir)),
        "fgcmr": f"{shlex.quote(cfg.python)} -m fgcmr.cli",
        "setup": "\n".join(cfg.setup),
        # double quotes: the value may name the node's own variables ($TMPDIR, $SLURM_JOB_ID), expanded on the node
        "scratch": f'export FGCMR_SCRATCH="{cfg.scratch}"'
        if cfg.scratch
        else "# no slurm.scratch: the default temp dir",
    }
    values = {**common, **job.values}
    values["prologue"] = fill((TEMPLATES / "prologue.sh").read_text(), values, "prologue.sh").rstrip("\n")
    values["header"] = header(job, cfg, name, logs)
    return fill((TEMPLATES / f"{job.name}.sbatch").read_text(), values, f"{job.name}.sbatch")


def fill(template: str, values: dict[str, str], where: str) -> str:
    """Replace every ``{{key}}``; a placeholder without a value is an error, not an empty string."""
    missing = sorted({m for m in PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise KeyError(f"{where}: no value for placeholder(s) {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
