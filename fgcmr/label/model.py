"""The siamese labeler: one shared text encoder, pooling → projection → L2 norm, and the pair head.

``p(a, b) = sigmoid(w · (e(a) ⊙ e(b)) + c)``. The head is a weighted inner product of normalised
embeddings, so scores for any set of pairs are one matrix product of stored embeddings.

A labeler directory is self-contained::

    encoder/            the transformers encoder (save_pretrained: config + weights)
    tokenizer/          the tokenizer (save_pretrained)
    head.safetensors    projection weight/bias, w [dim], c [1]
    labeler.json        pooling, dim, max_length
    config.yaml, metrics.json   written by ``fgcmr label train``
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from fgcmr.io import atomic_write_json, read_json
from fgcmr.label.config import EncoderConfig
from fgcmr.labels import pair_logits
from fgcmr.text import pool_tokens


class SiameseLabeler(nn.Module):
    def __init__(self, encoder: PreTrainedModel, dim: int, pooling: str = "mean", w_init: float = 10.0):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.proj = nn.Linear(encoder.config.hidden_size, dim)
        self.w = nn.Parameter(torch.full((dim,), w_init))
        self.c = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings [B, dim] of a tokenised batch."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.proj(pool_tokens(hidden, attention_mask, self.pooling)).float(), dim=-1)

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The head's logits ``w · (a_i ⊙ b_j) + c`` for every row pair (``labels.pair_logits``)."""
        return pair_logits(a, b, self.w, self.c)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"proj.weight": self.proj.weight, "proj.bias": self.proj.bias, "w": self.w, "c": self.c}


def build_encoder(cfg: EncoderConfig, vocab_size: int, pad_token_id: int, init: str | None) -> PreTrainedModel:
    """A pretrained encoder from a local directory, or a fresh one of ``cfg``'s shape."""
    if init:
        if not Path(init).is_dir():
            raise FileNotFoundError(f"--init: pretrained encoder directory not found: {init}")
        return AutoModel.from_pretrained(init, local_files_only=True)
    config = AutoConfig.for_model(
        cfg.model_type,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(512, cfg.max_length),
        pad_token_id=pad_token_id,
    )
    return AutoModel.from_config(config)


CHARS_PER_TOKEN = 10


def clip_chars(texts: list[str], max_length: int) -> list[str]:
    """Cut texts to ``CHARS_PER_TOKEN × max_length`` characters before tokenising.

    Only the first ``max_length`` tokens are kept anyway, and they practically never span more
    characters than this; tokenising whole long articles was a quarter of inference time.
    """
    limit = CHARS_PER_TOKEN * max_length
    return [t[:limit] for t in texts]


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        clip_chars(texts, max_length),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


Precision = Literal["auto", "fp32", "bf16", "fp16"]


def precision(dtype: Precision, device: torch.device) -> Literal["fp32", "bf16", "fp16"]:
    """The labeler's compute precision: ``auto`` means fp32 on CPU and bf16 on CUDA. Its weights stay fp32
    (training runs the forward under DeepSpeed's torch autocast, inference under ``autocast``)."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype


def autocast(device: torch.device, dtype: Precision) -> contextlib.AbstractContextManager:
    """Autocast to ``precision(dtype, device)``; fp32 runs without autocast."""
    dtype = precision(dtype, device)
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def save_labeler(out: str | Path, model: SiameseLabeler, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """Write everything inference needs; ``labeler.json`` goes last, so a directory without it is incomplete."""
    from safetensors.torch import save

    from fgcmr.io import atomic_write_bytes, honour_umask

    out = Path(out)
    model.encoder.save_pretrained(out / "encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    atomic_write_bytes(
        out / "head.safetensors",
        save({k: v.detach().float().cpu().contiguous() for k, v in model.head_state().items()}),
    )
    honour_umask(out)  # transformers' safetensors writer makes 0600 files
    atomic_write_json(
        out / "labeler.json", {"pooling": model.pooling, "dim": model.proj.out_features, "max_length": max_length}
    )


def load_labeler(path: str | Path) -> tuple[SiameseLabeler, PreTrainedTokenizerBase, int]:
    """(model in eval mode, tokenizer, max_length) from a labeler directory."""
    from safetensors.torch import load_file

    from fgcmr.text import load_tokenizer

    path = Path(path)
    if not (path / "labeler.json").is_file():
        raise FileNotFoundError(f"{path} is not a labeler directory (no labeler.json); run `fgcmr label train` first")
    info = read_json(path / "labeler.json")
    encoder = AutoModel.from_pretrained(str(path / "encoder"), local_files_only=True)
    model = SiameseLabeler(encoder, info["dim"], info["pooling"])
    head = load_file(str(path / "head.safetensors"))
    with torch.no_grad():
        for name, param in model.head_state().items():
            param.copy_(head[name])
    return model.eval(), load_tokenizer(path / "tokenizer"), int(info["max_length"])
