"""The two-tower retrieval model: towers → linear projections → L2-normalised joint space."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fgcmr.model.config import ModelConfig
from fgcmr.model.precision import fp32_batch_norms
from fgcmr.model.towers import build_image_tower, build_text_tower

TextBatch = dict[str, torch.Tensor] | torch.Tensor


class TwoTower(nn.Module):
    """``encode_image`` / ``encode_text`` give fp32 unit vectors of ``embed_dim``; ``logit_scale`` is CLIP's
    learnable temperature, shape ``(1,)`` because a 0-dim parameter breaks ``deepspeed.initialize``.

    Under bf16/fp16 the towers and projections run in the parameters' dtype and the normalisation,
    similarities and loss in fp32; BatchNorms compute in fp32 (``fp32_batch_norms``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.image_tower = build_image_tower(cfg.image)
        self.text_tower = build_text_tower(cfg.text)
        self.image_proj = _projection(self.image_tower.out_dim, cfg)
        self.text_proj = _projection(self.text_tower.out_dim, cfg)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        fp32_batch_norms(self)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(images)).float(), dim=-1)

    def encode_text(self, text: TextBatch) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_tower(text)).float(), dim=-1)

    def forward(self, images: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_emb, text_emb, logit_scale)``; the scale is returned (as a new tensor) so that a loss
        outside the module sees it even when ZeRO-3 has partitioned the parameter away again."""
        return self.encode_image(images), self.encode_text(text), self.logit_scale.float() * 1.0

    def save_pretrained(self, out_dir: str | Path, provenance: dict | None = None) -> Path:
        """HF-style: write this model as an export directory (``fgcmr.model.export.save_export``)."""
        from fgcmr.model.export import save_export

        return save_export(out_dir, self, self.config, provenance=provenance)

    @classmethod
    def from_pretrained(cls, export_dir: str | Path, device: str | torch.device = "cpu") -> "TwoTower":
        """HF-style: the model of an export directory, in eval mode (its ``config`` attached)."""
        from fgcmr.model.export import load_export

        return load_export(export_dir, device=device)[0]

    def tower_parameters(self) -> set[int]:
        """Ids of the backbone parameters (the part that may be pretrained), for a separate learning rate."""
        return {id(p) for tower in (self.image_tower, self.text_tower) for p in tower.parameters()}


def _projection(in_dim: int, cfg: ModelConfig) -> nn.Module:
    linear = nn.Linear(in_dim, cfg.embed_dim, bias=False)
    return (
        nn.Sequential(linear, nn.BatchNorm1d(cfg.embed_dim, affine=False)) if cfg.projection_norm == "batch" else linear
    )


def build_model(cfg: ModelConfig) -> TwoTower:
    return TwoTower(cfg)
