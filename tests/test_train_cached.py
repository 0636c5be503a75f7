"""fgcmr.train.cached: the in-process trainer of the ablation's quick runs, on a planted feature corpus."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fgcmr.config import ConfigError
from fgcmr.dataset import DatasetInfo
from fgcmr.labels import join_labels, write_head
from fgcmr.losses import LossConfig
from fgcmr.train.cached import CachedSplit, check_cacheable, leave_one_out, train_and_score
from fgcmr.runtime.optim import OptimConfig
from fgcmr.train.config import DataConfig, TrainConfig, load_model_config


def planted(n: int, seed: int, captions: int = 2) -> CachedSplit:
    """Images of 4 categories, each with ``captions`` texts; features are a noisy code of the category."""
    g = np.random.default_rng(seed)
    cat = np.arange(n) % 4
    code = np.eye(4)[cat]
    image = np.concatenate([code, np.zeros((n, 4))], 1) + 0.8 * g.standard_normal((n, 8))
    owner = np.repeat(np.arange(n), captions)
    text = np.concatenate([code[owner], np.zeros((len(owner), 2))], 1) + 0.8 * g.standard_normal((len(owner), 6))
    per_image = [
        np.concatenate([code[i : i + 1]] * captions) + 0.3 * g.standard_normal((captions, 4)) for i in range(n)
    ]
    label_text, desc, has = leave_one_out(per_image)
    return CachedSplit(
        image=torch.tensor(image, dtype=torch.float32),
        text=torch.tensor(text, dtype=torch.float32),
        owner=torch.from_numpy(owner),
        category=torch.from_numpy(cat),
        image_id=torch.arange(n),
        label_text_emb=label_text,
        desc_emb=desc,
        has_desc=has,
    )


def test_leave_one_out_matches_the_training_join():
    texts = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((1, 4), dtype=np.float32)]
    text, desc, has = leave_one_out(texts)
    rows = [join_labels(t, k) for t in texts for k in range(len(t))]
    assert np.allclose(text.numpy(), [r["label_text_emb"] for r in rows])
    assert np.allclose(desc.numpy(), [r["desc_emb"] for r in rows])
    assert has.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_cached_runs_learn_are_paired_by_seed_and_see_the_labels(tmp_path: Path):
    model_cfg = load_model_config(
        "features",
        {"image": {"feature_dim": 8, "hidden_dim": 32}, "text": {"feature_dim": 6, "hidden_dim": 32}, "embed_dim": 8},
    )
    dataset = DatasetInfo(root=tmp_path, manifest={"splits": {}})
    write_head(tmp_path, "labeler", np.full(4, 5.0, dtype=np.float32), -2.0)
    cfg = TrainConfig(
        shards=str(tmp_path),
        out=str(tmp_path / "run"),
        labels="labeler",
        loss=LossConfig(alpha=0.0),
        data=DataConfig(micro_batch=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        epochs=10,
    )
    train, test = planted(96, 0), planted(48, 1)
    base = train_and_score(cfg, model_cfg, train, test, dataset, nproc=2)
    assert base["steps"] == 10 * (96 // 32)
    assert base["map_avg"] > base["chance_map"] + 0.1  # it learns the planted categories
    assert train_and_score(cfg, model_cfg, train, test, dataset, nproc=2)["map_avg"] == base["map_avg"]  # paired
    other_seed = train_and_score(dataclasses.replace(cfg, seed=1), model_cfg, train, test, dataset, nproc=2)
    assert other_seed["map_avg"] != base["map_avg"]
    weighted = dataclasses.replace(cfg, loss=LossConfig(alpha=4.0))
    assert train_and_score(weighted, model_cfg, train, test, dataset, nproc=2)["map_avg"] != base["map_avg"]
    with pytest.raises(ConfigError, match="global batch"):
        train_and_score(dataclasses.replace(cfg, data=DataConfig(micro_batch=64)), model_cfg, train, test, dataset, 2)


def test_frozen_towers_must_be_pretrained():
    check_cacheable(load_model_config("features"))
    check_cacheable(load_model_config("pretrained_lite0_minilm"))
    with pytest.raises(ConfigError, match="image tower"):
        check_cacheable(load_model_config("tiny"))


@pytest.mark.slow  # real pretrained weights
def test_pretrained_towers_are_run_once_and_the_result_kept(synthetic_dataset, tmp_path: Path):
    """Also (issue 11): a run SIGKILLed as it puts its cache file in place leaves none; the rerun writes it whole."""
    import sys

    from kills import kill_when_paused, paused_env, start

    from fgcmr.dataset import open_dataset
    from fgcmr.train.cached import cache_split

    overrides = {"image": {"image_size": 32}, "text": {"max_length": 16}}
    cache, log, marker = tmp_path / "cache", tmp_path / "killed.log", tmp_path / "paused.json"
    code = (
        "import sys; from fgcmr.dataset import open_dataset; from fgcmr.train.cached import cache_split; "
        "from fgcmr.train.config import load_model_config; cache_split(open_dataset(sys.argv[1]), 'test', "
        f"load_model_config('pretrained_lite0_minilm', {overrides!r}), None, sys.argv[2])"
    )
    env = paused_env(f"{cache}/test-*.pt", marker)
    kill_when_paused(start([sys.executable, "-c", code, str(synthetic_dataset), str(cache)], log, env), marker, [log])
    assert not list(cache.glob("test-*.pt")) and len(list(cache.glob(".test-*.pt.*.tmp"))) == 1  # written, not put

    cfg = load_model_config("pretrained_lite0_minilm", overrides)
    dataset = open_dataset(synthetic_dataset)
    first = cache_split(dataset, "test", cfg, None, cache)  # the rerun
    assert first.image.shape == (dataset.items("test"), 1280) and first.text.shape[1] == 384  # tower outputs
    assert torch.equal(first.owner, torch.sort(first.owner).values) and first.desc_emb is None
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob("test-*.pt")]  # the leftover is gone
    again = cache_split(dataset, "test", cfg, None, cache)  # from the file
    assert torch.equal(again.image, first.image) and torch.equal(again.text, first.text)
    other = dataclasses.replace(cfg, embed_dim=128)  # another model config: another cache entry
    uninterrupted = cache_split(dataset, "test", other, None, cache)  # of the same frozen towers' outputs
    assert torch.equal(uninterrupted.image, first.image) and torch.equal(uninterrupted.text, first.text)
    assert len(list(cache.glob("test-*.pt"))) == 2


def test_pipeline_until_names_a_stage(tmp_path: Path):
    from fgcmr.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="no stage 'trian'"):
        run_pipeline("configs/experiments/synthetic-tiny.yaml", out=str(tmp_path / "x"), until="trian")
    assert not (tmp_path / "x").exists()  # refused before anything ran
