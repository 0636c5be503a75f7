"""Label inference streams batches ahead of the encoder: same sidecars, same tokens, errors not lost."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.distributed import DistEnv
from fgcmr.label.encode import embed_texts, token_ids
from fgcmr.label.infer import label_shards
from fgcmr.label.model import clip_chars, load_labeler
from fgcmr.label.stream import TextBatch, prefetch, shard_items
from fgcmr.labels import read_sidecar, sidecar_path

from test_label import infer_cfg, labeler  # noqa: F401  (fixture)


def test_streamed_sidecar_equals_whole_shard_embedding(labeler, synthetic_dataset, tmp_path):  # noqa: F811
    """Small windows and a short queue: keys in shard order, the texts' embeddings as if embedded all at once."""
    model, tokenizer, max_length = load_labeler(labeler[0])
    shards = open_dataset(synthetic_dataset).shards("train")[:2]
    cfg = infer_cfg(synthetic_dataset, labeler[0], name="stream", batch_size=3, window_batches=2, prefetch_batches=1)
    records = label_shards(model, tokenizer, max_length, shards, cfg, DistEnv())
    assert [r["status"] for r in records] == ["written", "written"]
    first = next(i for i in shard_items(shards[0], tokenizer, max_length, 3, 2) if isinstance(i, TextBatch))
    assert int(first.batch[0].max()) < 5  # the first window is the first sample's 5 texts, not the whole shard
    for shard in shards:
        samples = list(iter_samples(shard))
        sc = read_sidecar(sidecar_path(synthetic_dataset, "stream", shard.name), [s.key for s in samples])
        texts = [t for s in samples for t in s.texts]
        np.testing.assert_array_equal(sc.text_offsets, np.cumsum([0] + [len(s.texts) for s in samples]))
        whole = embed_texts(model, tokenizer, texts, max_length, 64, torch.device("cpu")).numpy()
        np.testing.assert_allclose(sc.text_emb, whole, atol=1e-3)  # sidecars store float16
        np.testing.assert_allclose(sc.desc_emb[0], whole[: len(samples[0].texts)].mean(0), atol=1e-3)


def test_token_ids_equal_tokenising_the_clipped_text(labeler):  # noqa: F811
    """The quick cut is kept only where it cannot change the kept tokens (cut words, no spaces, CJK)."""
    _, tokenizer, max_length = load_labeler(labeler[0])
    words = "a red circle and two large blue plus signs in the top left corner of a star".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, n)) for n in (3, 60, 90, 200, 400)]
    texts += ["x" * 2000, "ab " * 400 + "y" * 1000, "圆形的红色" * 200, "short", ""]
    expected = tokenizer(
        clip_chars(texts, max_length),
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
        return_attention_mask=False,
    )["input_ids"]
    assert token_ids(tokenizer, texts, max_length) == expected


def test_prefetch_reraises_producer_errors_and_stops_when_closed():
    def broken():
        yield 1
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        list(prefetch(broken(), 2))
    stream = prefetch(iter(range(10**6)), 2)
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "fgcmr-prefetch" for t in threading.enumerate())
