"""The label stages' configs and ``done`` checks (tokenizer, labeler training, inference), torch-free: the
pipeline builds and checks them before any stage runs, reading only stamps, hashes and sidecar files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from fgcmr.config import Validated
from fgcmr.dataset import open_dataset
from fgcmr.labels import labeler_identity, labels_dir, sidecar_path, sidecars_current
from fgcmr.run import Check, Fingerprint, check_stamp, file_hash, fingerprint
from fgcmr.wordpiece import SPECIAL_TOKENS


@dataclasses.dataclass
class EncoderConfig(Validated):
    """Architecture of an encoder built from scratch (ignored for hidden sizes when ``--init`` is given)."""

    model_type: str = "bert"  # transformers model type (AutoConfig.for_model)
    hidden_size: int = 128  # encoder width
    num_layers: int = 2  # encoder layers
    num_heads: int = 4  # attention heads
    intermediate_size: int = 512  # feed-forward width
    max_length: int = 128  # tokens per text (longer ones are cut)
    dim: int = 128  # projected embedding size
    pooling: Literal["mean", "cls"] = "mean"  # sentence vector: mean of tokens or the [CLS] token

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.max_length < 4 or self.dim < 1:
            raise ValueError("max_length must be ≥ 4 and dim ≥ 1")


@dataclasses.dataclass
class TokenizerConfig(Validated):
    shards: str  # dataset dir (fgcmr shard output)
    out: str  # tokenizer dir written
    vocab_size: int = 8000  # WordPiece vocabulary size
    min_frequency: int = 2  # words seen fewer times are not in it
    lowercase: bool = True  # lowercase texts first
    split: str = "train"  # the split whose texts it is fitted on

    def validate(self) -> None:
        if self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size={self.vocab_size} is too small")


def tokenizer_fingerprint(cfg: TokenizerConfig) -> Fingerprint:
    return fingerprint("tokenizer", cfg, {"manifest": file_hash(Path(cfg.shards) / "manifest.json")}, ("out",))


def tokenizer_done(cfg: TokenizerConfig) -> Check:
    return check_stamp(Path(cfg.out), tokenizer_fingerprint(cfg), "tokenizer")


@dataclasses.dataclass
class LabelTrainConfig(Validated):
    shards: str  # dataset dir (fgcmr shard output)
    out: str  # labeler dir written
    init: str | None = None  # local pretrained encoder dir (its tokenizer is used unless --tokenizer)
    tokenizer: str | None = None  # local tokenizer dir; default: trained on the train split
    vocab_size: int = 8000  # size of a tokenizer trained on the train split
    model: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    batch_size: int = 32  # texts per rank and step: batch_size / 2 anchors + one partner each
    lr: float = 5e-4  # projection and head
    encoder_lr: float | None = None  # default: lr
    freeze_layers: int = 0  # freeze the embeddings and the first N encoder layers (-1: the whole encoder)
    weight_decay: float = 0.01  # AdamW weight decay
    max_steps: int = 1000  # optimizer steps at most (early stopping may end sooner)
    warmup_steps: int = 20  # linear lr warmup steps
    eval_every: int = 50  # steps between validation AUCs
    patience: int = 4  # evaluations without a better validation AUC before stopping
    min_delta: float = 0.001  # a validation AUC must beat the best by this much to count as better
    calibrate: bool = True  # fit the head's scale and offset on held-out pairs (Platt scaling) after training
    val_fraction: float = 0.1  # share of the train split (whole images) held out for validation
    max_eval_texts: int = 1500  # texts per AUC evaluation at most (subsampled)
    eval_batch_size: int = 64  # texts per forward when evaluating
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # compute precision; auto: fp32 on CPU, bf16 on CUDA
    train_split: str = "train"  # the split it trains on
    test_split: str = "test"  # the split the test AUC is measured on
    test_fraction: float = 0.0  # > 0: carve the test part from the train split instead (data sets with one split)
    seed: int = 0  # seed of the carve, the batches and the initial weights
    tensorboard: bool = True  # write TensorBoard scalars under <out>/tensorboard
    threads: int | None = None  # torch CPU threads per rank (default: cores / local ranks)

    def validate(self) -> None:
        if self.batch_size < 4 or self.batch_size % 2:
            raise ValueError(f"batch_size={self.batch_size} must be even and ≥ 4")
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} must lie in (0, 1) and test_fraction={self.test_fraction} in [0, 1)"
            )


def labeler_fingerprint(cfg: LabelTrainConfig) -> Fingerprint:
    """The config, the dataset and the tokenizer it is given (``init`` is a path in the config)."""
    inputs = {
        "manifest": file_hash(Path(cfg.shards) / "manifest.json"),
        "tokenizer": file_hash(Path(cfg.tokenizer) / "tokenizer.json") if cfg.tokenizer else None,
    }
    return fingerprint("label", cfg, inputs, ("out", "threads", "tensorboard"))


def labeler_done(cfg: LabelTrainConfig) -> Check:
    return check_stamp(Path(cfg.out), labeler_fingerprint(cfg), "labeler")


@dataclasses.dataclass
class LabelInferConfig(Validated):
    shards: str  # dataset dir (fgcmr shard output)
    labeler: str  # labeler dir (fgcmr label train output)
    name: str | None = None  # labels/<name>/; default: the labeler directory's name
    batch_size: int = 64  # texts per forward
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    splits: list[str] = dataclasses.field(default_factory=list)  # default: every split
    verify_only: bool = False  # report missing/corrupt sidecars and exit non-zero if any
    hist_max_images: int = 1000  # images per split in the p histograms
    tensorboard: bool = True  # write the p histograms to TensorBoard
    threads: int | None = None  # torch CPU threads per rank (default: cores / local ranks)
    window_batches: int = 16  # texts are sorted by length within windows of up to this many batches
    prefetch_batches: int = 8  # batches tokenised ahead of the encoder

    def validate(self) -> None:
        for name in ("batch_size", "window_batches", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")

    @property
    def labeler_name(self) -> str:
        return self.name or Path(self.labeler).resolve().name


# Options that change how inference runs, never the sidecars it writes.
INFER_EXECUTION_FIELDS = (
    "verify_only",
    "batch_size",
    "tensorboard",
    "hist_max_images",
    "threads",
    "window_batches",
    "prefetch_batches",
)


def infer_fingerprint(cfg: LabelInferConfig) -> Fingerprint:
    labeler = Path(cfg.labeler)  # not trained yet when the pipeline asks up front: no identity, so not done
    identity = labeler_identity(labeler) if (labeler / "labeler.json").is_file() else None
    inputs = {"manifest": file_hash(Path(cfg.shards) / "manifest.json"), "labeler": identity}
    return fingerprint("infer", cfg, inputs, INFER_EXECUTION_FIELDS)


def infer_done(cfg: LabelInferConfig) -> Check:
    """Done when the labels were made by this labeler from this dataset and every shard has its sidecar."""
    out = labels_dir(cfg.shards, cfg.labeler_name)
    check = check_stamp(out, infer_fingerprint(cfg), "label sidecars")
    if not check.done:
        return check
    ds = open_dataset(cfg.shards)
    missing = [
        s.file
        for split in (cfg.splits or ds.split_names)
        for s in ds.shard_infos(split)
        if not sidecar_path(cfg.shards, cfg.labeler_name, s.file).is_file()
    ]
    if missing:
        return Check(False, f"{len(missing)} sidecars missing (first: {missing[0]})", exists=True)
    problem = sidecars_current(cfg.shards, cfg.labeler_name, cfg.labeler)
    return Check(False, problem, exists=True) if problem else check
