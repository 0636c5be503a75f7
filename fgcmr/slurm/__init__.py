"""Slurm: render an experiment's job chain from ``slurm/`` templates, submit it, report its state.

``submit_pipeline`` backs ``fgcmr submit pipeline <experiment.yaml> [--dry-run]``; ``chain_status``
backs ``fgcmr submit status --out=<dir>``. The experiment's ``slurm:`` section is ``SlurmConfig``.
"""

from fgcmr.slurm.config import JobResources, SlurmConfig
from fgcmr.slurm.submit import FAILED, chain_status, submit_pipeline

__all__ = ["FAILED", "JobResources", "SlurmConfig", "chain_status", "submit_pipeline"]
