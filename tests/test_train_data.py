"""The training input pipeline in one process: batches, label join by key, bad samples, shard checks."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fgcmr.config import ConfigError
from fgcmr.dataset import ShardError, iter_samples, open_dataset
from fgcmr.labels import SidecarError, read_sidecar, sidecar_path
from fgcmr.model import build_inputs
from fgcmr.text import ensure_tokenizer
from fgcmr.train.config import load_model_config
from fgcmr.train.config import DataConfig
from fgcmr.train.data import LabelJoin, build_pipeline, check_shard_split, check_sidecars, key_id

from test_train import LABELER, write_random_sidecars


@pytest.fixture(scope="module")
def inputs(synthetic_dataset, tmp_path_factory):
    texts = [t for s in iter_samples(open_dataset(synthetic_dataset).shards("train")[0]) for t in s.texts]
    cfg = load_model_config("tiny")
    cfg.text.tokenizer_dir = str(ensure_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t", 500, min_frequency=0))
    return build_inputs(cfg)


def test_batches_carry_labels_joined_by_key(synthetic_dataset: Path, inputs):
    write_random_sidecars(synthetic_dataset)
    ds = open_dataset(synthetic_dataset)
    urls = [str(p) for p in ds.shards("train")]
    pipe = build_pipeline(urls, inputs, DataConfig(micro_batch=8), 3, LabelJoin(ds.root, LABELER), seed=1)
    batches = list(pipe)
    assert len(batches) == 3  # an explicit epoch length, from endlessly resampled shards
    by_id = {}
    for url in urls:
        sc = read_sidecar(sidecar_path(ds.root, LABELER, Path(url).name))
        for i, (s, k) in enumerate(zip(iter_samples(url), sc.keys)):
            by_id[key_id(str(k))] = (s, sc.texts_of(i).astype(np.float32), sc.desc_emb[i].astype(np.float32))
    b = batches[0]
    assert b["image"].shape == (8, 3, 64, 64) and b["text"]["input_ids"].shape[0] == 8
    for j in range(8):
        sample, texts, desc = by_id[int(b["image_id"][j])]
        assert int(b["category"][j]) == sample.category
        k = next(
            i for i, t in enumerate(texts) if np.array_equal(t, b["label_text_emb"][j].numpy())
        )  # the drawn caption's label
        # the description leaves the paired caption out: the mean of the image's other captions
        np.testing.assert_allclose(b["desc_emb"][j].numpy(), np.delete(texts, k, 0).mean(0), rtol=1e-6)
        assert b["has_desc"][j] == 1.0
        ids = b["text"]["input_ids"][j][b["text"]["attention_mask"][j] > 0]
        assert ids.tolist() == inputs.text(sample, k).tolist()  # …is the caption the text tower gets


def test_missing_sidecars_and_too_few_shards_are_clear_errors(synthetic_dataset: Path):
    ds = open_dataset(synthetic_dataset)
    with pytest.raises(SidecarError, match="label sidecars missing"):
        check_sidecars(ds, "train", "no-such-labeler")
    n = len(ds.shards("train"))
    check_shard_split(ds, DataConfig(workers=n, micro_batch=8), 1)
    with pytest.raises(ConfigError, match=f"{n} train shards do not divide evenly among 2 ranks × {n} workers"):
        check_shard_split(ds, DataConfig(workers=n, micro_batch=8), 2)
    with pytest.raises(ConfigError, match="less than one micro-batch of 1000"):  # defect 6b: silently no step before
        check_shard_split(ds, DataConfig(workers=1, micro_batch=1000), 1)


def test_bad_samples_are_counted_and_skipped(synthetic_dataset: Path, inputs, tmp_path: Path, caplog):
    src = open_dataset(synthetic_dataset).shards("train")[0]
    bad = tmp_path / "bad.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for i, m in enumerate(tin):
            data = tin.extractfile(m).read()
            if m.name.endswith(".jpg") and i < 12:
                data = b"truncated"
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    n = len(list(iter_samples(bad)))
    pipe = build_pipeline([str(bad)], inputs, DataConfig(micro_batch=1, resampled=False), n, None, seed=0)
    with caplog.at_level("WARNING"):
        good = list(pipe)
    skipped = [r for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert skipped and len(good) >= n - len(skipped)
    assert all(torch.isfinite(b["image"]).all() for b in good)


def test_training_reader_fails_on_a_damaged_shard_naming_it_or_skips_it(
    synthetic_dataset: Path, inputs, tmp_path: Path, caplog
):
    """Defect 4: WebDataset's tar reader took a corrupt header for the end of the shard, silently."""
    from test_integrity import flip_header

    copy = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, copy, ignore=shutil.ignore_patterns(".parts", "labels"))
    shard = open_dataset(copy).shards("train")[0]
    flip_header(shard)
    with pytest.raises(ShardError, match=f"{shard.name} holds"):
        list(build_pipeline([str(shard)], inputs, DataConfig(micro_batch=1, resampled=False), 100, None, 0))
    with caplog.at_level("WARNING"):
        got = list(
            build_pipeline(
                [str(shard)], inputs, DataConfig(micro_batch=1, resampled=False, on_corrupt="skip"), 30, None, 0
            )
        )
    assert len(got) == 30  # the readable 20 samples, then again (an epoch is a number of batches)
    assert any("skipped the rest" in r.getMessage() and shard.name in r.getMessage() for r in caplog.records)
