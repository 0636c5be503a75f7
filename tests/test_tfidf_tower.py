"""The tfidf text tower: semantic matching's TF-IDF vectoriser as the text tower's input (fgcmr.model.tfidf)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fgcmr.dataset import Sample
from fgcmr.evaluate.baselines import tfidf_features
from fgcmr.model import build_model, fit_tokenizer, load_export, save_export
from fgcmr.model.tfidf import TFIDF_FILE, TfidfEncoder
from fgcmr.model.towers import FeatureMLP
from fgcmr.train.config import load_model_config

TEXTS = ["river bank river", "bank loan", "river fish", "loan shark fish"]  # every term in two texts but "shark"


def test_vectors_match_hand_computed_tfidf(tmp_path):
    enc = TfidfEncoder.fit(TEXTS)
    assert sorted(enc.vocabulary) == ["bank", "fish", "loan", "river"]  # "shark": one text only (min_df=2)
    # smooth idf = ln((1 + n) / (1 + df)) + 1 = ln(5/3) + 1 for every kept term (each in 2 of 4 texts);
    # sublinear tf: "river" twice → 1 + ln 2, "bank" once → 1; then L2-normalised.
    idf = math.log(5 / 3) + 1
    raw = {"river": (1 + math.log(2)) * idf, "bank": idf}
    norm = math.hypot(*raw.values())
    v = enc.encode("river bank river")
    for term, i in zip(enc.vocabulary, range(enc.dim)):
        assert v[i] == pytest.approx(raw.get(term, 0.0) / norm, rel=1e-6)
    assert v.dtype == np.float32
    # the same vectoriser as semantic matching's baseline, and the same after a JSON round trip
    base = tfidf_features(TEXTS, ["river bank river"]).test.toarray()[0]
    assert np.allclose(v, base, atol=1e-6)
    enc.save(tmp_path)
    assert np.array_equal(TfidfEncoder.load(tmp_path).encode("loan fish fish"), enc.encode("loan fish fish"))
    assert TfidfEncoder.fit(TEXTS, max_terms=2).dim == 2  # feature_dim caps the vocabulary


def test_cjk_texts_get_character_ngrams():
    enc = TfidfEncoder.fit(["北京下雨", "北京晴天", "上海下雨", "上海晴天"])
    assert enc.params["analyzer"] == "char" and "北京" in enc.vocabulary and "京" in enc.vocabulary


def test_tfidf_tower_fits_binds_trains_and_exports(tmp_path):
    cfg = load_model_config(
        "features",
        {
            "image": {"feature_dim": 8, "hidden_dim": 16},
            "text": {"kind": "tfidf", "feature_dim": 1000, "hidden_dim": 16},
            "embed_dim": 8,
        },
    )
    text = fit_tokenizer(cfg.text, TEXTS, tmp_path / "tokenizer")
    assert (tmp_path / "tokenizer" / TFIDF_FILE).is_file() and text.feature_dim == 4  # bound to the real size
    cfg = dataclasses.replace(cfg, text=text)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model.text_tower, FeatureMLP)
    out = save_export(tmp_path / "export", model, cfg)
    loaded, loaded_cfg, inputs = load_export(out)
    assert loaded_cfg.text.kind == "tfidf" and (out / "tokenizer" / TFIDF_FILE).is_file()
    s = Sample(key="k", meta={"texts": ["river fish", "bank loan"]}, image_feature=np.ones(8, np.float32))
    assert inputs.num_texts(s) == 2
    batch = inputs.collate_texts([inputs.text(s, k) for k in range(2)])
    assert batch.shape == (2, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(batch), model.encode_text(batch))


def test_tfidf_tower_needs_a_vocabulary_cap():
    with pytest.raises(ValueError, match="feature_dim"):
        load_model_config("features", {"image": {"feature_dim": 8}, "text": {"kind": "tfidf", "feature_dim": 0}})


def test_training_fits_the_vectoriser_on_the_train_split_once(synthetic_dataset, tmp_path):
    from fgcmr.dataset import iter_samples, open_dataset
    from fgcmr.distributed import DistEnv
    from fgcmr.train.config import DataConfig
    from fgcmr.train.loop import with_tokenizer

    dataset = open_dataset(synthetic_dataset)
    cfg = load_model_config("features", {"image": {"feature_dim": 8}, "text": {"kind": "tfidf", "feature_dim": 50}})
    bound = with_tokenizer(cfg, dataset, tmp_path, DistEnv(), DataConfig())
    path = tmp_path / "tokenizer" / TFIDF_FILE
    enc = TfidfEncoder.load(path.parent)
    assert bound.text.tokenizer_dir == str(path.parent) and bound.text.feature_dim == enc.dim <= 50
    train = [t for shard in dataset.shards("train") for s in iter_samples(shard) for t in s.texts]
    assert enc.vocabulary == TfidfEncoder.fit(train, 50).vocabulary  # fitted on the train texts
    stamp = path.stat().st_mtime_ns
    assert with_tokenizer(cfg, dataset, tmp_path, DistEnv(), DataConfig()) == bound  # a resume reuses it
    assert path.stat().st_mtime_ns == stamp
