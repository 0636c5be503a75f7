"""Losses against direct reference computations, and the gathered 2-process loss vs one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from fgcmr.labels import hardness, relevance
from fgcmr.losses import (
    LossConfig,
    RetrievalLoss,
    clip_loss,
    hardness_stats,
    pair_weights,
    pairwise_loss,
    shuffle_within,
    vse_loss,
)


def _batch(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    cat = torch.randint(0, 3, (n,), generator=g)
    cat[:2] = -1  # no category: relevant to its own text only
    ids = torch.arange(n)
    return img, txt, cat, ids, g


def test_pairwise_matches_reference_and_alpha_zero_is_unweighted():
    img, txt, cat, ids, g = _batch()
    s = img @ txt.T
    y = relevance(cat, cat, ids, ids)
    h = hardness(torch.rand(s.shape, generator=g), y)
    pos = (y > 0).float()
    loss, parts = pairwise_loss(s, pos * (1.0 + 0.7 * h), (1 - pos) * (1.0 + 0.7 * h), lam=0.35, margin=0.8)
    # direct reference: weighted moments written out element by element
    om = (1.0 + 0.7 * h).flatten().tolist()
    sv, yv = s.flatten().tolist(), y.flatten().tolist()

    def moments(keep):
        w = [o for o, t in zip(om, yv) if keep(t)]
        x = [v for v, t in zip(sv, yv) if keep(t)]
        mu = sum(a * b for a, b in zip(w, x)) / sum(w)
        return mu, sum(a * (b - mu) ** 2 for a, b in zip(w, x)) / sum(w)

    mp_, vp = moments(lambda t: t > 0)
    mn, vn = moments(lambda t: t == 0)
    ref = vp + vn + 0.35 * max(0.0, 0.8 - (mp_ - mn))
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert parts["mu_pos"].item() == pytest.approx(mp_, rel=1e-5)
    assert parts["var_neg"].item() == pytest.approx(vn, rel=1e-5)
    # unweighted = plain means and population variances
    loss0, _ = pairwise_loss(s, *pair_weights(y, None, LossConfig()))
    ref0 = (
        s[y > 0].var(unbiased=False)
        + s[y == 0].var(unbiased=False)
        + 0.35 * torch.clamp(0.8 - (s[y > 0].mean() - s[y == 0].mean()), min=0)
    )
    assert loss0.item() == pytest.approx(ref0.item(), rel=1e-5)
    # α = 0 through the full loss object is bit-identical to the unweighted loss
    batch = {
        "category": cat,
        "image_id": ids,
        "desc_emb": torch.randn(12, 4, generator=g),
        "label_text_emb": torch.randn(12, 4, generator=g),
        "has_desc": torch.ones(12),
    }
    head = (torch.randn(4, generator=g), 0.1)
    weighted0 = RetrievalLoss(LossConfig(name="weighted_pairwise", alpha=0.0), head)(img, txt, batch)
    unweighted = RetrievalLoss(LossConfig(name="pairwise"))(img, txt, batch)
    assert torch.equal(weighted0.loss, unweighted.loss)
    weighted1 = RetrievalLoss(LossConfig(name="weighted_pairwise", alpha=1.0), head)(img, txt, batch)
    assert not torch.equal(weighted1.loss, unweighted.loss)
    assert weighted1.omega.min() >= 1.0 and weighted1.omega.max() <= 2.0


def test_clip_loss_matches_reference():
    img, txt, cat, ids, _ = _batch()
    s = img @ txt.T
    scale = torch.tensor([2.0])
    # single positive (the diagonal): standard CLIP cross-entropy
    y = torch.eye(12)
    loss, parts = clip_loss(s, y, scale)
    logits = s * scale.exp()
    ref = 0.5 * (
        torch.nn.functional.cross_entropy(logits, torch.arange(12))
        + torch.nn.functional.cross_entropy(logits.T, torch.arange(12))
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert parts["temperature"].item() == pytest.approx(float(torch.exp(-scale)), rel=1e-6)
    # multi-positive: mean of −log p over each row's positives
    y = relevance(cat, cat, ids, ids)
    loss, _ = clip_loss(s, y, scale)

    def direction(lg, yy):
        rows = []
        for i in range(lg.shape[0]):
            lp = torch.log_softmax(lg[i], 0)
            rows.append(-lp[yy[i] > 0].mean())
        return torch.stack(rows).mean()

    ref = 0.5 * (direction(logits, y) + direction(logits.T, y.T))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_vse_loss_matches_reference():
    img, txt, cat, ids, _ = _batch()
    s = img @ txt.T
    y = relevance(cat, cat, ids, ids)
    loss, _ = vse_loss(s, y, margin=0.2)
    costs = []
    for i in range(12):
        for j in range(12):
            if y[i, j] > 0:
                neg_t = max((s[i, k].item() for k in range(12) if y[i, k] == 0), default=float("-inf"))
                neg_i = max((s[k, j].item() for k in range(12) if y[k, j] == 0), default=float("-inf"))
                costs.append(max(0.0, 0.2 + neg_t - s[i, j].item()) + max(0.0, 0.2 + neg_i - s[i, j].item()))
    assert loss.item() == pytest.approx(sum(costs) / len(costs), rel=1e-5)


def _gathered_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out[rank] = _loss_and_grads(rank, world)
    dist.destroy_process_group()


def _full_inputs():
    img, txt, cat, ids, g = _batch(n=8, d=6, seed=3)
    batch = {
        "category": cat,
        "image_id": ids,
        "desc_emb": torch.randn(8, 4, generator=g),
        "label_text_emb": torch.randn(8, 4, generator=g),
        "has_desc": (torch.arange(8) % 2).float(),
    }
    head = (torch.randn(4, generator=g), -0.2)
    return img, txt, batch, head


def _loss_and_grads(rank: int, world: int) -> dict:
    """Per loss: the loss value and ∂L/∂(this rank's embeddings) divided by world (what gradient averaging does)."""
    img, txt, batch, head = _full_inputs()
    n = img.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    result = {}
    for name in ("weighted_pairwise", "pairwise", "clip", "vse"):
        x = img[sl].clone().requires_grad_(True)
        t = txt[sl].clone().requires_grad_(True)
        scale = torch.tensor([2.3], requires_grad=True)
        local = {k: v[sl] for k, v in batch.items()}
        out = RetrievalLoss(LossConfig(name=name), head)(x, t, local, scale)
        out.loss.backward()
        result[name] = (out.loss.item(), x.grad / world, t.grad / world)
    return result


@pytest.mark.slow
def test_gathered_two_process_equals_single_process(free_port):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gathered_worker, args=(2, free_port, out), nprocs=2, join=True)
    single = _loss_and_grads(0, 1)
    for name, (loss, gx, gt) in single.items():
        for rank in range(2):
            r_loss, r_gx, r_gt = out[rank][name]
            assert r_loss == pytest.approx(loss, rel=1e-6), name
            torch.testing.assert_close(r_gx, gx[rank * 4 : (rank + 1) * 4], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(r_gt, gt[rank * 4 : (rank + 1) * 4], rtol=1e-5, atol=1e-7)


def _reference_pairwise(s, y, h, alpha, weighting, direction, lam=0.35, margin=0.8):
    """The formulations of ``fgcmr.losses`` written out pair by pair, in plain Python."""
    sv, yv, hv = s.flatten().tolist(), y.flatten().tolist(), h.flatten().tolist()
    if weighting == "graded":
        t = [(1 - alpha * hh) if yy > 0 else alpha * hh for yy, hh in zip(yv, hv)]
        classes = [(t, None), ([1 - x for x in t], None)]
    else:
        up = [1 + alpha * hh for hh in hv]
        wp = [(u if direction == "up" else 1 / u) if yy > 0 else 0.0 for u, yy in zip(up, yv)]
        wn = [u if yy == 0 else 0.0 for u, yy in zip(up, yv)]
        classes = [(wp, None), (wn, None)]
    out = []
    for w, _ in classes:
        members = [1.0 if x > 0 else 0.0 for x in w]
        n = sum(members)
        total = n if weighting == "unnormalised" else sum(w)
        mu = sum(a * b for a, b in zip(w, sv)) / total
        if weighting == "hinge_only":
            plain = sum(m * b for m, b in zip(members, sv)) / n
            var = sum(m * (b - plain) ** 2 for m, b in zip(members, sv)) / n
        else:
            var = sum(a * (b - mu) ** 2 for a, b in zip(w, sv)) / total
        out.append((mu, var))
    (mp, vp), (mn, vn) = out
    return vp + vn + lam * max(0.0, margin - (mp - mn))


@pytest.mark.parametrize(
    "weighting,direction,alpha",
    [
        ("normalised", "up", 1.0),
        ("normalised", "down", 4.0),
        ("unnormalised", "up", 1.0),
        ("unnormalised", "down", 1.0),
        ("hinge_only", "up", 4.0),
        ("graded", "up", 0.5),
        ("graded", "up", 1.0),
    ],
)
def test_weighting_formulations_match_hand_computed(weighting, direction, alpha):
    img, txt, cat, ids, g = _batch(n=10)
    s = img @ txt.T
    y = relevance(cat, cat, ids, ids)
    h = hardness(torch.rand(s.shape, generator=g), y)
    cfg = LossConfig(alpha=alpha, weighting=weighting, direction=direction)
    loss, parts = pairwise_loss(s, *pair_weights(y, h, cfg), 0.35, 0.8, weighting)
    assert loss.item() == pytest.approx(_reference_pairwise(s, y, h, alpha, weighting, direction), rel=1e-5)
    assert parts["gap"].item() == pytest.approx((parts["mu_pos"] - parts["mu_neg"]).item())


def test_weighting_edge_cases():
    img, txt, cat, ids, g = _batch(n=10)
    s = img @ txt.T
    y = relevance(cat, cat, ids, ids)
    h = hardness(torch.rand(s.shape, generator=g), y)
    plain = pairwise_loss(s, *pair_weights(y, None, LossConfig()))[0]
    for weighting in (
        "normalised",
        "unnormalised",
        "hinge_only",
        "graded",
    ):  # α = 0 is the unweighted loss for every one
        cfg = LossConfig(alpha=0.0, weighting=weighting)
        assert pairwise_loss(s, *pair_weights(y, h, cfg), weighting=weighting)[0].item() == pytest.approx(
            plain.item(), rel=1e-6
        )
    # down-weighting: hard positives weigh less than easy ones, negatives as with `up`
    w_pos, w_neg = pair_weights(y, h, LossConfig(alpha=1.0, direction="down"))
    pos = y > 0
    assert (
        torch.all(w_pos[pos] <= 1.0)
        and torch.all(w_pos[pos] > 0.5)
        and torch.equal(w_neg, pair_weights(y, h, LossConfig())[1])
    )
    # graded masses sum to one on every pair
    t, u = pair_weights(y, h, LossConfig(alpha=0.7, weighting="graded"))
    assert torch.allclose(t + u, torch.ones_like(t))
    with pytest.raises(ValueError, match="alpha"):
        LossConfig(alpha=2.0, weighting="graded").validate()


def _labelled_batch(cat: torch.Tensor, ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A loss batch with random label-sidecar embeddings (every image described by other texts)."""
    n = len(cat)
    return {
        "category": cat,
        "image_id": ids,
        "desc_emb": torch.randn(n, 4, generator=gen),
        "label_text_emb": torch.randn(n, 4, generator=gen),
        "has_desc": torch.ones(n),
    }


def test_shuffled_hardness_keeps_each_groups_values_and_moves_pairs():
    g = torch.Generator().manual_seed(3)
    h = torch.rand(8, 9, generator=g)
    groups = torch.randint(0, 4, (8, 9), generator=g)
    out = shuffle_within(h, groups, torch.Generator().manual_seed(0))
    for k in range(4):
        assert sorted(out[groups == k].tolist()) == sorted(h[groups == k].tolist())
    assert not torch.equal(out, h)
    assert torch.equal(out, shuffle_within(h, groups, torch.Generator().manual_seed(0)))  # same seed, same permutation
    # through the loss: the control changes the loss but keeps per-class-and-category mean hardness
    img, txt, cat, ids, gen = _batch(n=12)
    batch = _labelled_batch(cat, ids, gen)
    head = (torch.randn(4, generator=gen), 0.1)
    real = RetrievalLoss(LossConfig(), head)(img, txt, batch)
    control = RetrievalLoss(LossConfig(shuffle_hardness=True), head)(img, txt, batch)
    assert not torch.equal(real.loss, control.loss)
    for c in cat.unique():
        for cls in (real.y > 0, real.y <= 0):
            block = cls & (cat[:, None] == c)
            if block.any():
                assert control.h[block].mean().item() == pytest.approx(real.h[block].mean().item(), rel=1e-5)


def test_hardness_stats():
    img, txt, cat, ids, gen = _batch(n=12)
    batch = _labelled_batch(cat, ids, gen)
    out = RetrievalLoss(LossConfig(alpha=1.0), (torch.randn(4, generator=gen), 0.1))(img, txt, batch)
    stats = hardness_stats(out)
    neg = out.y <= 0
    assert stats["omega_cv_neg"] == pytest.approx(
        (out.omega[neg].std(unbiased=False) / out.omega[neg].mean()).item(), rel=1e-5
    )
    assert -1.0 <= stats["spearman_h_s_pos"] <= 1.0
    # a monotone function of s as hardness has Spearman exactly −1
    out.h = -out.s
    assert hardness_stats(out)["spearman_h_s_neg"] == pytest.approx(-1.0)
    assert hardness_stats(RetrievalLoss(LossConfig(name="pairwise"))(img, txt, batch)) == {}
