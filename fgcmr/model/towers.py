"""The towers: a backbone that maps one modality to a feature vector (``out_dim`` wide).

Image: any timm model (classifier removed) or an MLP over a precomputed feature.
Text: any transformers encoder, pooled (mean over tokens or CLS), or an MLP over a feature.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fgcmr.config import ConfigError
from fgcmr.model.config import ImageTowerConfig, TextTowerConfig, resolve_path
from fgcmr.model.partitioned import constructing_partitioned, load_into, open_weights
from fgcmr.text import pool_tokens

log = logging.getLogger("fgcmr.model")


class FeatureMLP(nn.Module):
    """Two-layer MLP for precomputed features (the Wikipedia SIFT / LDA vectors).

    ``sqrt`` applies the Hellinger map first: on bag-of-words histograms it turns the Euclidean geometry
    the MLP sees into the Bhattacharyya one, which suits histograms far better (as for the χ² kernel).
    """

    def __init__(self, in_dim: int, hidden_dim: int, sqrt: bool = False, dropout: float = 0.0):
        super().__init__()
        self.sqrt = sqrt
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
        )
        self.out_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.clamp_min(0).sqrt() if self.sqrt else x)


class TimmTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        import timm

        if cfg.pretrained and constructing_partitioned():
            raise ConfigError(
                f"image.pretrained: timm's own weights cannot load into a ZeRO-3-partitioned {cfg.name}; "
                "set image.checkpoint to a local weights file instead (it loads partition by partition)"
            )
        self.backbone = timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=0, **cfg.model_kwargs)
        if cfg.checkpoint:
            load_weights_in_order(self.backbone, resolve_path(cfg.checkpoint))
        if cfg.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        self.out_dim = self.backbone.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


class HFTextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if cfg.pretrained_dir:
            self.encoder = AutoModel.from_pretrained(resolve_path(cfg.pretrained_dir))
        else:
            kwargs = dict(cfg.config)
            model_type = kwargs.pop("model_type")
            self.encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs))
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused: its parameters would get no gradient
        if cfg.grad_checkpointing:
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.pooling = cfg.pooling
        self.out_dim = self.encoder.config.hidden_size

    def forward(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
        return pool_tokens(hidden, text["attention_mask"], self.pooling)


def _feature_mlp(cfg: ImageTowerConfig | TextTowerConfig) -> FeatureMLP:
    return FeatureMLP(cfg.feature_dim, cfg.hidden_dim, cfg.feature_sqrt, cfg.dropout)


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    return _feature_mlp(cfg) if cfg.kind == "feature" else TimmTower(cfg)


def build_text_tower(cfg: TextTowerConfig) -> nn.Module:
    return _feature_mlp(cfg) if cfg.kind in ("feature", "tfidf") else HFTextTower(cfg)


def load_weights_in_order(module: nn.Module, path: str | Path) -> None:
    """Load a weights file by name when the names match, else tensor by tensor in order (shapes must agree).

    Checkpoints from other code bases name layers differently but store them in the same order
    (e.g. the ``efficientnet-lite0`` weights onto timm's ``tf_efficientnet_lite0``); BatchNorm's
    ``num_batches_tracked`` counters are skipped, and the classifier is dropped when the tower has none.
    The file is read lazily and copied module by module (``load_into``), also into a ZeRO-3-partitioned tower.
    """
    source = open_weights(path)
    source_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    target = [k for k in module.state_dict(keep_vars=True) if not k.endswith("num_batches_tracked")]
    if set(target) <= set(source_keys):
        names = {k: k for k in target}
    else:
        if len(source_keys) < len(target):
            raise ValueError(f"{path}: {len(source_keys)} tensors, the model needs {len(target)}")
        names = dict(zip(target, source_keys))
    mapped = _Renamed(source, names)
    log.info("loaded %d tensors from %s", load_into(module, mapped, path), path)


class _Renamed(Mapping):
    """``source`` under the target's names (lazy: a tensor is read when looked up)."""

    def __init__(self, source: Mapping[str, torch.Tensor], names: dict[str, str]):
        self.source, self.names = source, names

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source[self.names[key]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
