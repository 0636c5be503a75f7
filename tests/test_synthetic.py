"""The embedded synthetic corpus: deterministic, balanced, learnable by construction, streaming."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
from PIL import Image

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.shard.readers.synthetic import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    SyntheticReader,
    spec_of,
    split_of,
)


def test_items_are_deterministic_per_index():
    a, b = SyntheticReader(50, seed=3), SyntheticReader(50, seed=3)
    refs = list(a.refs())
    for ref in refs[:10]:
        x, y = a.load(ref), b.load(ref)
        assert x.image == y.image and x.texts == y.texts
    assert SyntheticReader(50, seed=4).load(refs[0]).image != a.load(refs[0]).image
    # an item does not depend on the corpus size: the same index gives the same item
    assert SyntheticReader(10, seed=3).load(refs[7]).texts == a.load(refs[7]).texts


def test_split_categories_and_attributes_are_balanced_and_shared():
    n = 2000
    specs = [spec_of(0, i) for i in range(n)]
    splits = Counter(split_of(i) for i in range(n))
    assert splits == {"train": 1600, "test": 400}
    per_shape = Counter(s.shape for s in specs)
    assert len(per_shape) == 10 and min(per_shape.values()) > n / 10 * 0.75
    # every colour, size and position occurs with every shape: attributes are shared across categories
    for attr, values in (("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
        pairs = {(s.shape, getattr(s, attr)) for s in specs}
        assert len(pairs) == 10 * len(values), attr


def test_captions_differ_and_name_shape_and_attributes():
    reader = SyntheticReader(40, seed=0)
    for ref in list(reader.refs())[:40]:
        spec, item = spec_of(0, ref.data), reader.load(ref)
        assert len(item.texts) == 5 and len(set(item.texts)) == 5
        names = SYNONYMS[SHAPES[spec.shape]]
        assert sum(any(n.split()[0] in t for n in names) for t in item.texts) >= 4
        assert all(spec.colour in t for t in item.texts)


def test_image_shows_the_shape_in_its_colour():
    reader = SyntheticReader(20, seed=1, image_size=96)
    for ref in list(reader.refs())[:20]:
        spec, item = spec_of(1, ref.data), reader.load(ref)
        img = np.asarray(Image.open(io.BytesIO(item.image)).convert("RGB"), dtype=np.int32)
        assert img.shape == (96, 96, 3)
        close = (np.abs(img - np.array(COLOURS[spec.colour])).sum(-1) < 60).mean()
        assert 0.01 < close < 0.6, (ref.id, close)


def test_fixture_dataset_round_trips_through_the_seam_reader(synthetic_dataset):
    ds = open_dataset(synthetic_dataset)
    m = ds.manifest
    assert m["items_in"] == m["items_written"] + m["items_skipped"] == 240
    assert ds.split_names == ["train", "test"] and ds.items("train") == 192 and ds.items("test") == 48
    assert ds.categories == SHAPES
    keys = []
    for split in ds.split_names:
        for info, path in zip(ds.shard_infos(split), ds.shards(split)):
            samples = list(iter_samples(path))
            assert len(samples) == info.items <= 40
            for s in samples:
                assert "." not in s.key and s.meta["id"] == s.key and s.meta["split"] == split
                assert ds.categories[s.category] == s.meta["category_name"]
                assert s.image_ext == "jpg" and Image.open(io.BytesIO(s.image)).size == (64, 64)
                assert len(s.texts) == 5 and s.meta["image_size"] == [64, 64]
                keys.append(s.key)
    assert len(set(keys)) == 240


def test_text_tells_categories_apart_yet_has_hard_negatives():
    """A linear text model separates categories; raw word overlap does not (attributes dominate)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics.pairwise import cosine_similarity

    reader = SyntheticReader(600, seed=0)
    items = [reader.load(ref) for ref in reader.refs()]
    texts = {s: [t for i in items if i.split == s for t in i.texts] for s in ("train", "test")}
    labels = {s: np.array([i.category for i in items if i.split == s for _ in i.texts]) for s in ("train", "test")}
    words = CountVectorizer().fit(texts["train"])
    train, test = words.transform(texts["train"]), words.transform(texts["test"])
    accuracy = (LogisticRegression(max_iter=500).fit(train, labels["train"]).predict(test) == labels["test"]).mean()
    assert accuracy > 0.95
    nearest = cosine_similarity(test, train).argmax(1)
    assert (labels["train"][nearest] != labels["test"]).mean() > 0.2  # the most similar text is often another category


def test_planting_knobs_make_rare_and_mislabelled_captions():
    from fgcmr.shard.readers.synthetic import PARTNER, RARE, captions

    specs = [spec_of(0, i) for i in range(300)]
    plain = [captions(s, 5) for s in specs]
    assert all(captions(s, 5, 0.0, 0.0) == p for s, p in zip(specs, plain))  # off by default: unchanged texts
    rare = [captions(s, 5, atypical=1.0) for s in specs]
    assert all(RARE[SHAPES[s.shape]].split()[-1] in c for s, cs in zip(specs, rare) for c in cs)
    wrong = [captions(s, 5, mislabel=1.0) for s in specs]
    partner_names = lambda s: SYNONYMS[SHAPES[PARTNER[s.shape]]]  # noqa: E731
    assert all(any(n.split()[0] in c for n in partner_names(s)) for s, cs in zip(specs, wrong) for c in cs)
    # at 20 % about a fifth of captions are planted, drawn independently per caption
    some = sum(a != b for s, p in zip(specs, plain) for a, b in zip(captions(s, 5, atypical=0.2), p))
    assert 0.14 * 1500 < some < 0.26 * 1500
    assert PARTNER[PARTNER[3]] == 3 and set(PARTNER) == set(range(len(SHAPES)))


def test_atypical_knob_plants_hard_negatives_between_confusable_partners():
    """What ``atypical`` plants: a planted caption shares words with the confusable partner shape's planted
    captions (hard negatives, 3× the word overlap of plain partner captions). It does not plant hard
    positives a category labeler can see (docs/results_notes.md: the labeler scores them as easy as plain ones)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from fgcmr.shard.readers.synthetic import PARTNER, captions

    specs = [spec_of(0, i) for i in range(400)]
    plain = [captions(s, 5) for s in specs]
    planted = [captions(s, 5, atypical=0.2) for s in specs]
    is_rare = np.array([a != b for p, q in zip(plain, planted) for a, b in zip(p, q)])
    assert 0.14 < is_rare.mean() < 0.26
    vec = TfidfVectorizer().fit([c for cs in plain + planted for c in cs])
    x = vec.transform([c for cs in planted for c in cs]).toarray()
    shape = np.repeat([s.shape for s in specs], 5)
    cross = x @ x.T

    def overlap(rows: np.ndarray, partner_rows: np.ndarray) -> float:
        pairs = [cross[np.ix_(rows & (shape == k), partner_rows & (shape == PARTNER[k]))].mean() for k in range(10)]
        return float(np.mean(pairs))

    rare_pairs, plain_pairs = overlap(is_rare, is_rare), overlap(~is_rare, ~is_rare)
    assert rare_pairs > 2 * plain_pairs, (rare_pairs, plain_pairs)  # 0.34 vs 0.12 measured
    assert [captions(s, 5, atypical=0.0) for s in specs] == plain  # at 0 nothing is planted
