"""The training job's configuration (``fgcmr train``: its loss, data and optimizer options) and its named model
configs (``configs/models/``), torch-free so that the pipeline builds and checks it without loading the stack."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from fgcmr.config import Validated, apply_overrides, build, named_config_path, read_yaml
from fgcmr.model.config import ModelConfig
from fgcmr.runtime.optim import OptimConfig


@dataclasses.dataclass
class LossConfig(Validated):
    # the loss: weighted_pairwise needs label sidecars (--labels)
    name: Literal["weighted_pairwise", "pairwise", "clip", "vse"] = "weighted_pairwise"
    lam: float = 0.35  # λ: weight of the mean-gap hinge
    margin: float = 0.8  # m: wanted gap μ₊ − μ₋
    alpha: float = 1.0  # α: strength of the fine-grained labels (ω = 1 + α·h; graded: α ∈ [0, 1])
    weighting: Literal["normalised", "unnormalised", "hinge_only", "graded"] = "normalised"  # how labels enter
    direction: Literal["up", "down"] = "up"  # positives: up = hard ones count more (paper), down = less
    shuffle_hardness: bool = False  # control: h permuted within relevance class × image category
    shuffle_seed: int = 0  # seed of that permutation
    vse_margin: float = 0.2  # vse: the hinge's margin

    def validate(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"loss.alpha must be ≥ 0, got {self.alpha}")
        if self.weighting == "graded" and self.alpha > 1:
            raise ValueError(
                f"loss.weighting=graded mixes 0/1 and graded labels: alpha must be in [0, 1], got {self.alpha}"
            )

    @property
    def needs_labels(self) -> bool:
        return self.name == "weighted_pairwise"


@dataclasses.dataclass
class DataConfig:
    micro_batch: int = 32  # per rank, per forward
    workers: int = 2  # DataLoader workers per rank
    resampled: bool = True  # sample shards with replacement (no shard-count constraint, equal batches per rank)
    samples_per_epoch: int | None = None  # default: the split's item count
    shuffle_buffer: int = 500  # samples in each worker's shuffle buffer
    augment: bool = True  # timm's training transform (else its eval transform)
    split: str = "train"  # the split trained on
    tokenizer_samples: int = 100_000  # texts read to train a tokenizer when the model has none
    on_corrupt: Literal["error", "skip"] = "error"  # a shard that differs from the manifest: fail, or skip it (logged)


@dataclasses.dataclass
class TrainConfig(Validated):
    shards: str  # dataset dir (fgcmr shard output)
    out: str  # run dir
    model: str = "tiny"  # a configs/models/<name>.yaml or a path to one
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. --model_overrides.embed_dim=128
    deepspeed: str = "zero0_fp32"  # a configs/deepspeed/<name>.json or a path to one
    init_from: str | None = None  # an fgcmr export dir whose weights start the model (loaded partitioned under ZeRO-3)
    labels: str | None = None  # labeler name: sidecars under <shards>/labels/<name>/
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    epochs: int = 1  # passes over the split (by samples_per_epoch)
    max_steps: int | None = None  # overrides epochs × steps per epoch
    seed: int = 0  # seed of the weights and the data order
    resume: str | None = None  # "auto" (or "latest"): the run's newest complete checkpoint; or a tag dir / tag name
    checkpoint_every: int = 500  # optimizer steps
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    log_every: int = 10  # steps between log lines and scalars
    hist_every: int = 100  # steps between TensorBoard histograms
    eval_every: int = 0  # steps between validation scalars (val/* in TensorBoard); 0: off
    eval_split: str | None = None  # held-out split embedded for them; default: val (a shard holdout) if any, else test
    eval_max_images: int = 256  # images of that split embedded at most

    def validate(self) -> None:
        if self.loss.needs_labels and not self.labels:
            raise ValueError(
                f"loss {self.loss.name!r} needs label sidecars: pass --labels=<labeler name> (or --loss.name=pairwise)"
            )
        for name in ("checkpoint_every", "keep_last", "log_every", "hist_every", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1")


def load_model_config(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    data = read_yaml(named_config_path(name, "models", ".yaml"))
    data = apply_overrides(data, _flatten(overrides or {}))
    return build(ModelConfig, data, "model")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
