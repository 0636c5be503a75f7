"""The list of stages, once: what the CLI, ``fgcmr pipeline`` and ``fgcmr submit`` all read.

Each stage names its experiment section, its config class, its entry point and its ``done`` check
(``fgcmr.run.Check``, next to its writer) as ``module:attribute`` strings, so that importing this
table (and ``fgcmr --help``) imports no stage module. Config classes and checks live in torch-free modules
(``fgcmr.shard.config``, ``fgcmr.label.config``, ``fgcmr.train.config``, ...): the pipeline and ``fgcmr submit``
build, validate and check every stage without loading the training stack.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from fgcmr.config import build, load_config
from fgcmr.run import Check


def _attr(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # also its experiment section
    words: tuple[str, ...]  # the CLI words that run it
    config: str  # "module:ConfigClass"
    entry: str  # "module:function" taking the config
    check: str  # "module:function" taking the config, returning a Check
    distributed: bool  # runs on N ranks (torchrun / srun) rather than one process
    optional: bool = False  # runs only when the experiment has its section
    output: str = ""  # the ``fgcmr.run.Layout`` attribute of its output directory
    protect: str = ""  # set: output made from another config or inputs is kept, the pipeline refuses saying this
    forceable: bool = False  # --force deletes protected output and redoes the stage
    slurm_job: str = ""  # the Slurm job of the chain that runs it
    rerun_args: tuple[str, ...] = ()  # what pipeline and Slurm jobs add so that a rerun continues the work

    @property
    def config_class(self) -> type:
        return _attr(self.config)

    def load(self, path: str | Path | None, overrides: dict[str, Any] | None = None) -> Any:
        """The stage's typed config from a stage or experiment file (its section) and overrides."""
        return load_config(self.config_class, path, overrides, section=self.name)

    def build(self, section: dict) -> Any:
        return build(self.config_class, section, self.name)

    def run(self, cfg: Any) -> Any:
        return _attr(self.entry)(cfg)

    def done(self, cfg: Any) -> Check:
        return _attr(self.check)(cfg)


STAGES: tuple[Stage, ...] = (
    Stage(
        "shard",
        ("shard",),
        "fgcmr.shard.config:ShardConfig",
        "fgcmr.shard.job:run",
        "fgcmr.shard.config:done",
        False,
        output="shards",
        protect="which other runs may share; delete it or set data_dir elsewhere",
        slurm_job="shard",
    ),
    Stage(
        "tokenizer",
        ("label", "tokenizer"),
        "fgcmr.label.config:TokenizerConfig",
        "fgcmr.label.tokenizer:run",
        "fgcmr.label.config:tokenizer_done",
        False,
        optional=True,
        output="tokenizer",
        slurm_job="label",
    ),
    Stage(
        "label",
        ("label", "train"),
        "fgcmr.label.config:LabelTrainConfig",
        "fgcmr.label.train:run",
        "fgcmr.label.config:labeler_done",
        True,
        optional=True,
        output="labeler",
        slurm_job="label",
    ),
    Stage(
        "infer",
        ("label", "infer"),
        "fgcmr.label.config:LabelInferConfig",
        "fgcmr.label.infer:run",
        "fgcmr.label.config:infer_done",
        True,
        optional=True,
        output="labeler",
        slurm_job="infer",
    ),
    Stage(
        "train",
        ("train",),
        "fgcmr.train.config:TrainConfig",
        "fgcmr.train.loop:run",
        "fgcmr.train.state:done",
        True,
        output="run",
        protect="whose checkpoints would be lost; rerun with --force to retrain (deletes it) or use a new --out",
        forceable=True,
        slurm_job="train",
        rerun_args=("--resume=auto",),
    ),
    Stage(
        "export",
        ("export",),
        "fgcmr.train.export_config:ExportConfig",
        "fgcmr.train.export:run",
        "fgcmr.train.export_config:done",
        False,
        output="export",
        slurm_job="eval",
    ),
    Stage(
        "eval",
        ("eval",),
        "fgcmr.evaluate.config:EvalConfig",
        "fgcmr.evaluate.job:run",
        "fgcmr.evaluate.config:done",
        True,
        output="eval",
        slurm_job="eval",
    ),
)
BY_NAME = {s.name: s for s in STAGES}
SECTIONS = tuple(BY_NAME)


def stage(name: str) -> Stage:
    return BY_NAME[name]
