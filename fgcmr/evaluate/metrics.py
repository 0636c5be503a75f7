"""Cross-modal retrieval metrics from two embedding matrices, in both directions.

Inputs: N images and M texts (several texts may belong to one image), each with

- an *owner*: the image a text belongs to (images own themselves), for the instance protocol;
- a *category* (int ≥ 0, or < 0 for none), for the category protocol.

Metrics per direction (``i2t``: each image queries all texts; ``t2i``: each text queries all images):

- ``map``: MAP@all with relevance = same category (the Wikipedia/TVGraz protocol); when the data has
  no categories, relevance falls back to the same image (as in ``fgcmr.labels.relevance``);
- ``map_r``: MAP@R (R = the query's number of relevant items; Musgrave et al. 2020), same relevance;
- ``r1/r5/r10``: Recall@K with relevance = same image (the COCO/Flickr protocol): an image query is a
  hit when any of its captions is in the top K; each caption queries for its image;
- ``medr``/``meanr``: the 1-based rank of the first same-image item.

**Tie policy.** Gallery items are ranked by similarity, descending; equal similarities keep gallery
index order (a stable sort). Every metric, and the brute-force reference in the tests, uses this order.
Queries with no relevant item are skipped and counted (``skipped``).

Work is done in blocks of queries, so memory is ``block × gallery`` whatever the data size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RECALL_KS = (1, 5, 10)
PR_POINTS = np.linspace(0.0, 1.0, 11)


@dataclasses.dataclass
class Direction:
    """The metrics of one direction; ``pr`` is 11-point interpolated precision at ``PR_POINTS``."""

    map: float
    map_r: float
    recall: dict[int, float]
    medr: float
    meanr: float
    queries: int
    skipped: int
    pr: list[float]


def rank_order(sim: np.ndarray) -> np.ndarray:
    """Gallery indices per query row, best first, ties in index order (the tie policy)."""
    return np.argsort(-sim, axis=1, kind="stable")


def average_precision(rel_sorted: np.ndarray, at_r: bool = False) -> np.ndarray:
    """AP of each row of a relevance matrix already in ranked order (nan for rows without positives).

    ``at_r``: AP@R, precision summed over the first R ranks only and divided by R.
    """
    rel = rel_sorted.astype(np.float64)
    n_rel = rel.sum(axis=1)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    precision = np.cumsum(rel, axis=1) / ranks
    hits = precision * rel
    if at_r:
        hits = hits * (ranks[None, :] <= n_rel[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, hits.sum(axis=1) / n_rel, np.nan)


def interpolated_pr(rel_sorted: np.ndarray) -> np.ndarray:
    """Per row, the 11-point interpolated precision (max precision at recall ≥ r); nan without positives."""
    rel = rel_sorted.astype(np.float64)
    n_rel = rel.sum(axis=1, keepdims=True)
    cum = np.cumsum(rel, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = cum / n_rel
    precision = cum / np.arange(1, rel.shape[1] + 1)
    # running max from the right: the best precision reachable at this recall or beyond
    best = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    out = np.empty((rel.shape[0], len(PR_POINTS)))
    for j, r in enumerate(PR_POINTS):
        idx = np.argmax(recall >= r - 1e-12, axis=1)  # first rank reaching recall r
        out[:, j] = best[np.arange(rel.shape[0]), idx]
    out[n_rel[:, 0] == 0] = np.nan
    return out


def first_hit_rank(rel_sorted: np.ndarray) -> np.ndarray:
    """1-based rank of the first relevant item per row (inf when none)."""
    any_rel = rel_sorted.any(axis=1)
    return np.where(any_rel, np.argmax(rel_sorted, axis=1) + 1, np.inf)


def relevance_by_category(q_cat: np.ndarray, g_cat: np.ndarray, q_own: np.ndarray, g_own: np.ndarray) -> np.ndarray:
    """Same category where both have one (≥ 0), else same image."""
    has = (q_cat[:, None] >= 0) & (g_cat[None, :] >= 0)
    return np.where(has, q_cat[:, None] == g_cat[None, :], q_own[:, None] == g_own[None, :])


def direction(
    q_emb: np.ndarray,
    g_emb: np.ndarray,
    q_cat: np.ndarray,
    g_cat: np.ndarray,
    q_own: np.ndarray,
    g_own: np.ndarray,
    block: int = 512,
) -> Direction:
    """All metrics of one direction: queries ``q_*`` against gallery ``g_*``."""
    aps, apr, prs, first = [], [], [], []
    for s in range(0, len(q_emb), block):
        e = slice(s, s + block)
        order = rank_order(q_emb[e] @ g_emb.T)
        rel_cat = np.take_along_axis(relevance_by_category(q_cat[e], g_cat, q_own[e], g_own), order, axis=1)
        rel_inst = g_own[order] == q_own[e, None]
        aps.append(average_precision(rel_cat))
        apr.append(average_precision(rel_cat, at_r=True))
        prs.append(interpolated_pr(rel_cat))
        first.append(first_hit_rank(rel_inst))
    ap, ap_r, pr, rank = (np.concatenate(x) for x in (aps, apr, prs, first))
    valid = ~np.isnan(ap)
    found = np.isfinite(rank)
    return Direction(
        map=float(ap[valid].mean()) if valid.any() else float("nan"),
        map_r=float(ap_r[valid].mean()) if valid.any() else float("nan"),
        recall={k: float((rank <= k).mean()) for k in RECALL_KS},
        medr=float(np.median(rank)) if len(rank) else float("nan"),
        meanr=float(rank[found].mean()) if found.any() else float("nan"),
        queries=int(len(ap)),
        skipped=int((~valid).sum()),
        pr=[float(x) for x in np.nanmean(pr, axis=0)] if valid.any() else [float("nan")] * len(PR_POINTS),
    )


def expected_random_ap(n_rel: np.ndarray, n: int) -> np.ndarray:
    """Exact expected AP of a uniformly random ranking of ``n`` items with ``n_rel`` relevant.

    E[AP] = (1/n) · (H_n + (R − 1)/(n − 1) · (n − H_n)), from E[P@k | item k relevant] = (1 + (k − 1)(R − 1)/(n − 1))/k.
    """
    h = float(np.sum(1.0 / np.arange(1, n + 1)))
    r = np.asarray(n_rel, dtype=np.float64)
    if n == 1:
        return np.ones_like(r)
    return (h + (r - 1) / (n - 1) * (n - h)) / n


def chance_map(img_cat: np.ndarray, txt_cat: np.ndarray, txt_owner: np.ndarray) -> dict[str, float]:
    """Expected MAP@all of a random ranking, per direction and averaged (the level to beat)."""
    img_own = np.arange(len(img_cat))
    out = {}
    for name, (qc, gc, qo, go) in {
        "i2t": (img_cat, txt_cat, img_own, txt_owner),
        "t2i": (txt_cat, img_cat, txt_owner, img_own),
    }.items():
        n_rel = np.concatenate(
            [
                relevance_by_category(qc[s : s + 1024], gc, qo[s : s + 1024], go).sum(axis=1)
                for s in range(0, len(qc), 1024)
            ]
        )
        n_rel = n_rel[n_rel > 0]
        out[name] = float(expected_random_ap(n_rel, len(gc)).mean()) if len(n_rel) else float("nan")
    out["avg"] = (out["i2t"] + out["t2i"]) / 2
    return out


def retrieval_metrics(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    img_cat: np.ndarray,
    txt_owner: np.ndarray,
) -> dict:
    """The flat metrics dictionary written to ``metrics.json`` (plus ``pr_*`` curves).

    ``img_emb`` [N, d] and ``txt_emb`` [M, d] (L2-normalised: similarity is the inner product);
    ``img_cat`` [N] category per image (< 0 for none); ``txt_owner`` [M] the image index of each text.
    """
    img_cat = np.asarray(img_cat, dtype=np.int64)
    txt_owner = np.asarray(txt_owner, dtype=np.int64)
    if len(img_emb) != len(img_cat) or len(txt_emb) != len(txt_owner):
        raise ValueError(
            f"{len(img_emb)} images with {len(img_cat)} categories, {len(txt_emb)} texts with {len(txt_owner)} owners"
        )
    if len(txt_owner) and (txt_owner.min() < 0 or txt_owner.max() >= len(img_emb)):
        raise ValueError("a text's owner is not an image index")
    txt_cat = img_cat[txt_owner]
    img_own = np.arange(len(img_emb))
    img_emb = np.asarray(img_emb, dtype=np.float32)
    txt_emb = np.asarray(txt_emb, dtype=np.float32)
    res = {
        "i2t": direction(img_emb, txt_emb, img_cat, txt_cat, img_own, txt_owner),
        "t2i": direction(txt_emb, img_emb, txt_cat, img_cat, txt_owner, img_own),
    }
    out: dict = {}
    for name, d in res.items():
        out[f"map_{name}"] = d.map
        out[f"mapr_{name}"] = d.map_r
        for k in RECALL_KS:
            out[f"r{k}_{name}"] = d.recall[k]
        out[f"medr_{name}"] = d.medr
        out[f"meanr_{name}"] = d.meanr
        out[f"queries_{name}"] = d.queries
        out[f"skipped_{name}"] = d.skipped
    out["map_avg"] = (out["map_i2t"] + out["map_t2i"]) / 2
    out["mapr_avg"] = (out["mapr_i2t"] + out["mapr_t2i"]) / 2
    out["rsum"] = sum(out[f"r{k}_{n}"] for k in RECALL_KS for n in res)
    chance = chance_map(img_cat, txt_cat, txt_owner)
    out["chance_map"] = chance["avg"]
    out["chance_map_i2t"], out["chance_map_t2i"] = chance["i2t"], chance["t2i"]
    out["category_relevance"] = bool((img_cat >= 0).any())
    out["pr_i2t"], out["pr_t2i"] = res["i2t"].pr, res["t2i"].pr
    return out
