"""Label quality: ROC-AUC of the pair score for relevant vs irrelevant text pairs.

Every unordered pair of distinct texts counts once. Large sets are subsampled to ``max_texts`` texts
(deterministically), which keeps the pair count quadratic in a bounded number.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fgcmr.label.texts import TextSet
from fgcmr.labels import pair_scores


@dataclasses.dataclass
class PairStats:
    auc: float
    texts: int
    positives: int
    negatives: int
    p_pos: np.ndarray
    p_neg: np.ndarray

    def summary(self) -> dict:
        return {
            "auc": self.auc,
            "texts": self.texts,
            "positive_pairs": self.positives,
            "negative_pairs": self.negatives,
            "mean_p_positive": float(self.p_pos.mean()) if self.positives else None,
            "mean_p_negative": float(self.p_neg.mean()) if self.negatives else None,
            "hardness_std": float(np.concatenate([1 - self.p_pos, self.p_neg]).std()),
        }


def subsample(texts: TextSet, max_texts: int, seed: int = 0) -> TextSet:
    if len(texts) <= max_texts:
        return texts
    return texts.subset(np.sort(np.random.default_rng(seed).choice(len(texts), max_texts, replace=False)))


def pair_stats(emb: torch.Tensor, texts: TextSet, w: torch.Tensor, c: torch.Tensor) -> PairStats:
    """Scores of all distinct pairs of ``emb`` (rows of ``texts``) and their ROC-AUC."""
    with torch.no_grad():
        p = pair_scores(emb, emb, w.detach().cpu(), c.detach().cpu())
    y = texts.targets()
    iu = torch.triu_indices(len(texts), len(texts), offset=1)
    p, y = p[iu[0], iu[1]].numpy(), y[iu[0], iu[1]].numpy() > 0
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return PairStats(auc, len(texts), int(y.sum()), int((~y).sum()), p[y], p[~y])


def fit_platt(z: torch.Tensor, y: torch.Tensor, iters: int = 100) -> tuple[float, float]:
    """``(a, b)`` minimising the class-balanced BCE of ``sigmoid(a·z + b)`` against ``y`` (Platt scaling).

    Balanced so that ``p`` reads as the chance of relevance at equal priors: negatives far outnumber
    positives among all pairs, and the loss trains on balanced batches too.
    """
    z, y = z.double().flatten(), (y.flatten() > 0).double()
    weight = torch.where(y > 0, 0.5 / y.sum().clamp_min(1), 0.5 / (1 - y).sum().clamp_min(1))
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            weight
            * torch.nn.functional.binary_cross_entropy_with_logits(params[0] * z + params[1], y, reduction="none")
        ).sum()
        loss.backward()
        return loss

    opt.step(closure)
    a, b = params.detach().tolist()
    return a, b
