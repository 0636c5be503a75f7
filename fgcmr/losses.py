"""Retrieval losses over the global batch: the fine-grained weighted pairwise loss and its baselines.

With ``s[i, j]`` the cosine similarity of image i and text j, ``y`` the relevance matrix and
``h`` the hardness from the label stage (``fgcmr.labels``):

- ``pairwise``: ``L = σ²₊ + σ²₋ + λ·max(0, m − (μ₊ − μ₋))`` with means and variances of ``s`` over
  positives (₊) and negatives (₋). ``weighted_pairwise`` lets the fine-grained labels weight them,
  ``pairwise`` does not (the paper's baseline; α = 0 gives exactly the same numbers). How the labels
  enter is ``weighting``, with ``ω₋ = 1 + α·h`` on negatives and on positives ``ω₊ = 1 + α·h``
  (``direction: up``, hard positives count more: the paper) or ``ω₊ = 1 / (1 + α·h)`` (``down``:
  suspected mismatches count less, for noisy web pairs):

  - ``normalised``: ω-weighted moments, ``μ = Σ ω·s / Σ ω``, ``σ² = Σ ω·(s − μ)² / Σ ω``;
  - ``unnormalised``: ``μ = Σ ω·s / N``, ``σ² = Σ ω·(s − μ)² / N`` (N pairs of the class), so the
    weights also scale each term;
  - ``hinge_only``: ω-weighted means in the hinge, unweighted variances;
  - ``graded``: the fine-grained label replaces the 0/1 label: each pair is a positive with mass
    ``t = y·(1 − α·h) + (1 − y)·α·h`` (= ``(1 − α)·y + α·p``, α ∈ [0, 1]) and a negative with mass
    ``1 − t``; moments are mass-weighted as in ``normalised``.

  ``shuffle_hardness`` is the control: ``h`` permuted at random among the pairs of one relevance class
  and image category, which keeps every per-category average but not *which* pair is hard; a gain
  from the labels must beat it (``scripts/ablate_weighting.py``);
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

import torch

from fgcmr.distributed import all_gather_with_grad
from fgcmr.labels import hardness, label_scores, relevance
from fgcmr.train.config import LossConfig

LOG_MAX_SCALE = math.log(100.0)  # CLIP clamps the temperature's inverse at 100


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # detached scalars for logging
    s: torch.Tensor  # detached similarity matrix, for histograms
    y: torch.Tensor
    omega: torch.Tensor | None  # each pair's weight (positive + negative mass)
    h: torch.Tensor | None = None  # the hardness the weights came from


def pair_weights(y: torch.Tensor, h: torch.Tensor | None, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's mass as a positive and as a negative (the 0/1 masks when there are no labels)."""
    pos = (y > 0).float()
    if h is None:
        return pos, 1.0 - pos
    if cfg.weighting == "graded":
        t = pos * (1.0 - cfg.alpha * h) + (1.0 - pos) * cfg.alpha * h
        return t, 1.0 - t
    up = 1.0 + cfg.alpha * h
    return pos * (up if cfg.direction == "up" else 1.0 / up), (1.0 - pos) * up


def _moments(s: torch.Tensor, w: torch.Tensor, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    members = (w > 0).float()
    count = members.sum().clamp_min(1.0)
    total = count if weighting == "unnormalised" else w.sum().clamp_min(1e-12)
    mu = (w * s).sum() / total
    if weighting == "hinge_only":
        plain_mu = (members * s).sum() / count
        return mu, (members * (s - plain_mu) ** 2).sum() / count
    return mu, (w * (s - mu) ** 2).sum() / total


def pairwise_loss(
    s: torch.Tensor,
    w_pos: torch.Tensor,
    w_neg: torch.Tensor,
    lam: float = 0.35,
    margin: float = 0.8,
    weighting: str = "normalised",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``σ²₊ + σ²₋ + λ·max(0, m − (μ₊ − μ₋))`` with moments over each pair's positive / negative mass."""
    mu_pos, var_pos = _moments(s, w_pos, weighting)
    mu_neg, var_neg = _moments(s, w_neg, weighting)
    gap = mu_pos - mu_neg
    loss = var_pos + var_neg + lam * torch.clamp(margin - gap, min=0.0)
    return loss, {"mu_pos": mu_pos, "mu_neg": mu_neg, "var_pos": var_pos, "var_neg": var_neg, "gap": gap}


def shuffle_within(h: torch.Tensor, groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``h`` permuted at random inside each group of equal ``groups`` value (same shape)."""
    flat, g = h.flatten(), groups.flatten().double()
    noise = torch.rand(flat.numel(), generator=generator, dtype=torch.float64).to(g.device)
    random_order = torch.argsort(g + 0.5 * noise)  # by group, random inside a group (groups are integers)
    group_order = torch.argsort(g, stable=True)
    out = torch.empty_like(flat)
    out[group_order] = flat[random_order]
    return out.view_as(h)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (torch.argsort(torch.argsort(x)).double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def hardness_stats(out: LossOutput) -> dict[str, float]:
    """How much the fine-grained labels can move the loss: CV of ω and Spearman of h with s, per class."""
    if out.omega is None or out.h is None:
        return {}
    stats = {}
    for name, mask in (("pos", out.y > 0), ("neg", out.y <= 0)):
        omega, h, s = out.omega[mask].double(), out.h[mask].double(), out.s[mask].double()
        if omega.numel() >= 3:
            stats[f"omega_cv_{name}"] = float(omega.std(unbiased=False) / omega.mean().clamp_min(1e-12))
            stats[f"spearman_h_s_{name}"] = _spearman(h, s)
    return stats


def _multi_positive_nll(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a positive of ``−mean_{j∈P(i)} log softmax(logits[i])_j``."""
    logp = torch.log_softmax(logits, dim=1)
    count = pos.sum(1)
    rows = count > 0
    return (-(logp * pos).sum(1)[rows] / count[rows]).mean()


def clip_loss(
    s: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        # Same seed and same call sequence on every rank: each rank shuffles the gathered batch alike.
        self.generator = torch.Generator().manual_seed(cfg.shuffle_seed)

    def __call__(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        batch: dict[str, torch.Tensor],
        logit_scale: torch.Tensor | None = None,
    ) -> LossOutput:
        img = all_gather_with_grad(image_emb.float())
        txt = all_gather_with_grad(text_emb.float())
        cat = all_gather_with_grad(batch["category"])
        ids = all_gather_with_grad(batch["image_id"])
        y = relevance(cat, cat, ids, ids)
        s = img @ txt.T
        name = self.cfg.name
        h = self._hardness(batch, y, cat, ids) if name == "weighted_pairwise" else None
        omega = None
        if name in ("weighted_pairwise", "pairwise"):
            w_pos, w_neg = pair_weights(y, h, self.cfg)
            loss, parts = pairwise_loss(s, w_pos, w_neg, self.cfg.lam, self.cfg.margin, self.cfg.weighting)
            omega = None if h is None else w_pos + w_neg
        elif name == "clip":
            loss, parts = clip_loss(s, y, logit_scale)
        else:
            loss, parts = vse_loss(s, y, self.cfg.vse_margin)
        return LossOutput(loss, {k: v.detach() for k, v in parts.items()}, s.detach(), y, omega, h)

    def _hardness(
        self, batch: dict[str, torch.Tensor], y: torch.Tensor, cat: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        w, c = self.head
        p = label_scores(
            all_gather_with_grad(batch["desc_emb"]),
            all_gather_with_grad(batch["label_text_emb"]),
            all_gather_with_grad(batch["has_desc"]),
            ids,
            w.to(y.device),
            c,
        )
        h = hardness(p, y)
        if self.cfg.shuffle_hardness:
            groups = (y > 0).long() * (int(cat.max()) + 2) + (cat[:, None] + 1)  # relevance class × image category
            h = shuffle_within(h, groups, self.generator)
        return h
