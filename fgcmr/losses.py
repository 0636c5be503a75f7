"""Retrieval losses over the global batch: the fine-grained weighted pairwise loss and its baselines.

With ``s[i, j]`` the cosine similarity of image i and text j, ``y`` the relevance matrix and
``ω = 1 + α·h`` the hardness weights from the label stage (``fgcmr.labels``):

- ``pairwise``: ``L = σ²₊ + σ²₋ + λ·max(0, m − (μ₊ − μ₋))`` with ω-weighted means and variances of
  ``s`` over positives (₊) and negatives (₋); ``weighted_pairwise`` uses the labels' ω, ``pairwise``
  ω = 1 (the paper's baseline; α = 0 gives exactly the same numbers);
- ``clip``: InfoNCE in both directions with a learnable temperature, averaged over every positive of
  a row (multi-positive when several texts share an image's category);
- ``vse``: VSE++ max-violation hinge, each positive pair against its hardest negative text and image.

Every rank computes the loss of the whole gathered batch. The gradient-carrying all-gather sends
each rank the sum over ranks of the gradients of its own slice, i.e. ``world × ∂L/∂x``; DeepSpeed's
(and DDP's) gradient averaging divides by ``world``, so parameters get exactly ``∂L/∂θ``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from fgcmr.distributed import all_gather_with_grad
from fgcmr.labels import hardness, label_scores, relevance

LOG_MAX_SCALE = math.log(100.0)  # CLIP clamps the temperature's inverse at 100


@dataclasses.dataclass
class LossConfig:
    name: Literal["weighted_pairwise", "pairwise", "clip", "vse"] = "weighted_pairwise"
    lam: float = 0.35  # λ: weight of the mean-gap hinge
    margin: float = 0.8  # m: wanted gap μ₊ − μ₋
    alpha: float = 1.0  # α: ω = 1 + α·h
    vse_margin: float = 0.2

    @property
    def needs_labels(self) -> bool:
        return self.name == "weighted_pairwise"


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # detached scalars for logging
    s: torch.Tensor  # detached similarity matrix, for histograms
    y: torch.Tensor
    omega: torch.Tensor | None


def _weighted_moments(s: torch.Tensor, mask: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = omega * mask
    total = w.sum().clamp_min(1e-12)
    mu = (w * s).sum() / total
    var = (w * (s - mu) ** 2).sum() / total
    return mu, var


def pairwise_loss(s: torch.Tensor, y: torch.Tensor, omega: torch.Tensor | None = None, lam: float = 0.35, margin: float = 0.8) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``σ²₊ + σ²₋ + λ·max(0, m − (μ₊ − μ₋))``, moments weighted by ``omega`` (ones when None)."""
    omega = torch.ones_like(s) if omega is None else omega
    pos = (y > 0).to(s.dtype)
    mu_pos, var_pos = _weighted_moments(s, pos, omega)
    mu_neg, var_neg = _weighted_moments(s, 1.0 - pos, omega)
    loss = var_pos + var_neg + lam * torch.clamp(margin - (mu_pos - mu_neg), min=0.0)
    return loss, {"mu_pos": mu_pos, "mu_neg": mu_neg, "var_pos": var_pos, "var_neg": var_neg}


def _multi_positive_nll(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a positive of ``−mean_{j∈P(i)} log softmax(logits[i])_j``."""
    logp = torch.log_softmax(logits, dim=1)
    count = pos.sum(1)
    rows = count > 0
    return (-(logp * pos).sum(1)[rows] / count[rows]).mean()


def clip_loss(s: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scale = logit_scale.clamp(max=LOG_MAX_SCALE).exp()
    logits = scale * s
    pos = (y > 0).to(s.dtype)
    loss = 0.5 * (_multi_positive_nll(logits, pos) + _multi_positive_nll(logits.T, pos.T))
    return loss, {"temperature": 1.0 / scale.reshape(())}


def vse_loss(s: torch.Tensor, y: torch.Tensor, margin: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over positive pairs of the hinge against the hardest negative text (row) and image (column)."""
    pos = y > 0
    negs = s.masked_fill(pos, float("-inf"))
    hardest_text = negs.max(dim=1, keepdim=True).values
    hardest_image = negs.max(dim=0, keepdim=True).values
    cost = (margin + hardest_text - s).clamp(min=0) + (margin + hardest_image - s).clamp(min=0)
    return cost[pos].mean(), {}


class RetrievalLoss:
    """The configured loss over the batch gathered from every rank.

    ``batch`` carries ``category`` and ``image_id`` (int64 per image; its text shares them) and, for
    the weighted loss, the label stage's ``desc_emb``, ``label_text_emb`` and ``has_desc``
    (``fgcmr.labels.join_labels``); ``head`` is the
    labeler's ``(w, c)``.
    """

    def __init__(self, cfg: LossConfig, head: tuple[torch.Tensor, float] | None = None):
        if cfg.needs_labels and head is None:
            raise ValueError("the weighted_pairwise loss needs the labeler head (w, c)")
        self.cfg, self.head = cfg, head

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, batch: dict[str, torch.Tensor], logit_scale: torch.Tensor | None = None) -> LossOutput:
        img = all_gather_with_grad(image_emb.float())
        txt = all_gather_with_grad(text_emb.float())
        cat = all_gather_with_grad(batch["category"])
        ids = all_gather_with_grad(batch["image_id"])
        y = relevance(cat, cat, ids, ids)
        s = img @ txt.T
        omega = None
        name = self.cfg.name
        if name == "weighted_pairwise":
            w, c = self.head
            p = label_scores(all_gather_with_grad(batch["desc_emb"]), all_gather_with_grad(batch["label_text_emb"]),
                             all_gather_with_grad(batch["has_desc"]), ids, w.to(s.device), c)
            omega = 1.0 + self.cfg.alpha * hardness(p, y)
        if name in ("weighted_pairwise", "pairwise"):
            loss, parts = pairwise_loss(s, y, omega, self.cfg.lam, self.cfg.margin)
        elif name == "clip":
            loss, parts = clip_loss(s, y, logit_scale)
        else:
            loss, parts = vse_loss(s, y, self.cfg.vse_margin)
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()}, s.detach(), y, omega)
