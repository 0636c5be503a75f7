"""Retrieval metrics against a brute-force, loop-by-loop reference (same tie policy), including ties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fgcmr.evaluate.metrics import chance_map, expected_random_ap, retrieval_metrics


def _ranked(scores: np.ndarray) -> list[int]:
    """The tie policy spelled out: higher score first, equal scores by gallery index."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def _ap(rel: list[bool], at_r: bool) -> float | None:
    r = sum(rel)
    if r == 0:
        return None
    hits, total = 0, 0.0
    for k, is_rel in enumerate(rel, start=1):
        if is_rel:
            hits += 1
            if not at_r or k <= r:
                total += hits / k
    return total / r


def _reference(img, txt, img_cat, owner) -> dict:
    """Every metric by plain loops over queries and ranks."""
    n, m = len(img), len(txt)
    txt_cat = [img_cat[o] for o in owner]

    def rel_cat(qc, gc, qo, go):
        return qc == gc if qc >= 0 and gc >= 0 else qo == go

    out = {}
    dirs = {
        "i2t": [(img[i], img_cat[i], i) for i in range(n)],
        "t2i": [(txt[j], txt_cat[j], owner[j]) for j in range(m)],
    }
    galleries = {
        "i2t": [(txt[j], txt_cat[j], owner[j]) for j in range(m)],
        "t2i": [(img[i], img_cat[i], i) for i in range(n)],
    }
    for name, queries in dirs.items():
        gallery = galleries[name]
        aps, aprs, ranks = [], [], []
        for qe, qc, qo in queries:
            scores = np.array([float(np.dot(qe, ge)) for ge, _, _ in gallery], dtype=np.float32)
            order = _ranked(scores)
            rc = [rel_cat(qc, gallery[j][1], qo, gallery[j][2]) for j in order]
            ri = [gallery[j][2] == qo for j in order]
            if (a := _ap(rc, False)) is not None:
                aps.append(a)
                aprs.append(_ap(rc, True))
            ranks.append(ri.index(True) + 1 if any(ri) else math.inf)
        out[f"map_{name}"] = float(np.mean(aps))
        out[f"mapr_{name}"] = float(np.mean(aprs))
        for k in (1, 5, 10):
            out[f"r{k}_{name}"] = float(np.mean([r <= k for r in ranks]))
        out[f"medr_{name}"] = float(np.median(ranks))
    return out


def _random_case(rng, n_img, caps, n_cat, dim, quantise):
    img = rng.normal(size=(n_img, dim)).astype(np.float32)
    owner = np.repeat(np.arange(n_img), caps)
    txt = (img[owner] * 0.5 + rng.normal(size=(len(owner), dim))).astype(np.float32)
    if quantise:  # coarse values make many exact ties in the similarity matrix
        img, txt = np.round(img), np.round(txt)
    cat = rng.integers(0, n_cat, size=n_img) if n_cat else np.full(n_img, -1)
    return img, txt, cat, owner


@pytest.mark.parametrize(
    "seed,n_img,caps,n_cat,quantise",
    [
        (0, 17, 1, 4, False),
        (1, 13, 3, 3, True),
        (2, 25, 2, 0, True),  # no categories: MAP falls back to same-image relevance
        (3, 9, 5, 2, True),
    ],
)
def test_metrics_match_brute_force(seed, n_img, caps, n_cat, quantise):
    img, txt, cat, owner = _random_case(np.random.default_rng(seed), n_img, caps, n_cat, 3, quantise)
    got = retrieval_metrics(img, txt, cat, owner)
    want = _reference(img, txt, cat, owner)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["map_avg"] == pytest.approx((want["map_i2t"] + want["map_t2i"]) / 2)


def test_ties_follow_gallery_order():
    """All similarities equal: the ranking is the gallery order, so the metrics are known exactly."""
    img = np.zeros((3, 2), np.float32)
    txt = np.zeros((3, 2), np.float32)
    got = retrieval_metrics(img, txt, np.array([0, 1, 0]), np.array([0, 1, 2]))
    # i2t, instance ranks of image 0,1,2 = 1,2,3
    assert got["r1_i2t"] == pytest.approx(1 / 3)
    assert got["medr_i2t"] == 2
    # category MAP: image 0 (cat 0) sees texts of cats [0,1,0] → AP = (1 + 2/3)/2
    ap0 = (1 + 2 / 3) / 2
    ap1 = 1 / 2
    assert got["map_i2t"] == pytest.approx((ap0 + ap1 + ap0) / 3)


def test_perfect_embeddings_give_perfect_scores():
    rng = np.random.default_rng(0)
    img = np.eye(6, dtype=np.float32)
    owner = np.repeat(np.arange(6), 3)
    got = retrieval_metrics(img, img[owner] + 0.01 * rng.random((18, 6)).astype(np.float32), np.arange(6), owner)
    for key in ("r1_i2t", "r1_t2i", "map_i2t", "map_t2i"):
        assert got[key] == pytest.approx(1.0), key
    assert got["medr_i2t"] == got["medr_t2i"] == 1
    assert got["pr_i2t"][0] == pytest.approx(1.0)


def test_query_without_relevant_items_is_skipped_and_counted():
    img = np.eye(3, dtype=np.float32)
    # image 2 has no text, and its category (2) occurs nowhere else
    got = retrieval_metrics(img, img[[0, 1]], np.array([0, 1, 2]), np.array([0, 1]))
    assert got["skipped_i2t"] == 1 and got["queries_i2t"] == 3
    assert got["map_i2t"] == pytest.approx(1.0)
    assert got["r1_i2t"] == pytest.approx(2 / 3)  # the text-less image can never be a hit


def test_expected_random_ap_matches_simulation():
    rng = np.random.default_rng(0)
    n, r = 12, 4
    rel = np.zeros(n, bool)
    rel[:r] = True
    sims = []
    for _ in range(20000):
        perm = rng.permutation(rel)
        cum = np.cumsum(perm)
        sims.append(((cum / np.arange(1, n + 1)) * perm).sum() / r)
    assert expected_random_ap(np.array([r]), n)[0] == pytest.approx(np.mean(sims), abs=3e-3)


def test_chance_map_of_balanced_categories_is_near_class_fraction():
    cat = np.arange(1000) % 10
    c = chance_map(cat, cat, np.arange(1000))
    assert 0.1 < c["avg"] < 0.11


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((2, 2)), np.zeros((2, 2)), np.array([0]), np.array([0, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((2, 2)), np.zeros((2, 2)), np.array([0, 1]), np.array([0, 2]))
