"""The label seam: sidecar round trip, key checks, verification, and the head's score math."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fgcmr.label.model import EncoderConfig, SiameseLabeler, build_encoder
from fgcmr.labels import SidecarError, hardness, pair_scores, read_sidecar, relevance, write_sidecar


def test_sidecar_round_trip_and_key_check(tmp_path):
    keys = ["a", "b", "c"]
    text_emb = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    offsets = np.array([0, 1, 3, 5])
    desc = np.stack([text_emb[offsets[i] : offsets[i + 1]].mean(0) for i in range(3)])
    path = tmp_path / "train-000000.npz"
    write_sidecar(path, keys, text_emb, offsets, desc)
    sc = read_sidecar(path, keys)
    assert sc.text_emb.dtype == np.float16 and sc.desc_emb.dtype == np.float16
    np.testing.assert_allclose(sc.texts_of(1), text_emb[1:3], atol=1e-3)
    assert list(sc.by_key()) == keys
    with pytest.raises(SidecarError, match="first difference at position 1"):
        read_sidecar(path, ["a", "x", "c"])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SidecarError, match="unreadable"):
        read_sidecar(path)
    with pytest.raises(SidecarError, match="missing"):
        read_sidecar(tmp_path / "nope.npz")


def test_labeler_head_is_the_seam_score():
    """Training's ``sigmoid(logits)`` and the loss-side ``pair_scores`` must be the same function."""
    torch.manual_seed(0)
    model = SiameseLabeler(build_encoder(EncoderConfig(hidden_size=16, num_heads=2, intermediate_size=32, dim=8), 50, 0, None), 8)
    with torch.no_grad():
        model.w.normal_()
        model.c.fill_(-0.3)
    a, b = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    expected = torch.sigmoid(model.logits(a, b)).detach()
    torch.testing.assert_close(pair_scores(a, b, model.w.detach(), model.c.detach()), expected)
    brute = torch.tensor([[torch.sigmoid((model.w * a[i] * b[j]).sum() + model.c).item() for j in range(4)] for i in range(3)])
    torch.testing.assert_close(expected, brute)


def test_relevance_and_hardness():
    cat = torch.tensor([0, 1, -1])
    img = torch.tensor([0, 1, 2])
    y = relevance(cat, torch.tensor([0, 0, -1, -1]), img, torch.tensor([5, 6, 2, 1]))
    assert y.tolist() == [[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    p = torch.tensor([[0.9, 0.2]])
    assert hardness(p, torch.tensor([[1.0, 0.0]]))[0].tolist() == pytest.approx([0.1, 0.2])
