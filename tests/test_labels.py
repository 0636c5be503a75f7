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
    model = SiameseLabeler(
        build_encoder(EncoderConfig(hidden_size=16, num_heads=2, intermediate_size=32, dim=8), 50, 0, None), 8
    )
    with torch.no_grad():
        model.w.normal_()
        model.c.fill_(-0.3)
    a, b = (
        torch.nn.functional.normalize(torch.randn(3, 8), dim=-1),
        torch.nn.functional.normalize(torch.randn(4, 8), dim=-1),
    )
    expected = torch.sigmoid(model.logits(a, b)).detach()
    torch.testing.assert_close(pair_scores(a, b, model.w.detach(), model.c.detach()), expected)
    brute = torch.tensor(
        [[torch.sigmoid((model.w * a[i] * b[j]).sum() + model.c).item() for j in range(4)] for i in range(3)]
    )
    torch.testing.assert_close(expected, brute)


def test_relevance_and_hardness():
    cat = torch.tensor([0, 1, -1])
    img = torch.tensor([0, 1, 2])
    y = relevance(cat, torch.tensor([0, 0, -1, -1]), img, torch.tensor([5, 6, 2, 1]))
    assert y.tolist() == [[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    p = torch.tensor([[0.9, 0.2]])
    assert hardness(p, torch.tensor([[1.0, 0.0]]))[0].tolist() == pytest.approx([0.1, 0.2])


def test_leave_one_out_description_and_single_caption_images():
    from fgcmr.labels import join_labels, label_scores
    from fgcmr.losses import LossConfig, RetrievalLoss

    three = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float16)
    j = join_labels(three, 0)  # the mean of the other two captions, not of all three (no leak of t_0)
    np.testing.assert_array_equal(j["desc_emb"], [0.5, 1.0])
    np.testing.assert_array_equal(j["label_text_emb"], [1, 0])
    assert j["has_desc"] == 1.0 and j["desc_emb"].dtype == np.float32
    np.testing.assert_allclose(join_labels(three, 2)["desc_emb"], (3 * three.astype(np.float32).mean(0) - three[2]) / 2)
    one = join_labels(np.array([[2, 3]], dtype=np.float16), 0)  # one caption: it describes the image for negatives
    np.testing.assert_array_equal(one["desc_emb"], [2, 3])
    assert one["has_desc"] == 0.0
    desc = torch.tensor([[0.5, 1.0], [2.0, 3.0]])
    text = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    w, c = torch.tensor([1.0, 1.0]), 0.0
    p = label_scores(desc, text, torch.tensor([1.0, 0.0]), torch.tensor([7, 9]), w, c)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(p.numpy(), [[sig(0.5), sig(4.0)], [sig(2.0), 1.0]], rtol=1e-6)
    # in the weighted loss the single-caption image's matched pair gets ω = 1 (h = 0), its negative ω = 1 + α·p
    batch = {
        "category": torch.tensor([-1, -1]),
        "image_id": torch.tensor([7, 9]),
        "desc_emb": desc,
        "label_text_emb": text,
        "has_desc": torch.tensor([1.0, 0.0]),
    }
    out = RetrievalLoss(LossConfig(alpha=2.0), (w, c))(torch.eye(2), torch.eye(2), batch)
    np.testing.assert_allclose(
        out.omega.numpy(), [[1 + 2 * (1 - sig(0.5)), 1 + 2 * sig(4.0)], [1 + 2 * sig(2.0), 1.0]], rtol=1e-6
    )


def test_labeler_refuses_a_corpus_without_positive_pairs():
    from fgcmr.config import ConfigError
    from fgcmr.label.texts import TextSet
    from fgcmr.label.train import check_positive_pairs

    single = TextSet(["a", "b", "c"], np.array([-1, -1, -1]), np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="no positive pairs.*--loss.name=pairwise"):
        check_positive_pairs(single, "shards/x")
    check_positive_pairs(
        TextSet(["a", "b", "c"], np.array([-1, -1, -1]), np.array([0, 0, 2])), "x"
    )  # two captions of image 0
    check_positive_pairs(TextSet(["a", "b"], np.array([3, 3]), np.array([0, 1])), "x")  # one category
