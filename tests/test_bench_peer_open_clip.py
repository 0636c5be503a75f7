"""The open_clip peer benchmark: the same model on both sides, the measurement, and one real open_clip run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip_train.data")  # the optional bench dependency (and the pandas it imports)

from fgcmr.bench import peer_open_clip as peer  # noqa: E402
from fgcmr.dataset import open_dataset  # noqa: E402
from fgcmr.model import build_model  # noqa: E402
from fgcmr.train.config import load_model_config  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(synthetic_dataset, tmp_path_factory) -> Path:
    return peer.train_tokenizer(
        open_dataset(str(synthetic_dataset)), load_model_config("tiny"), tmp_path_factory.mktemp("tok") / "tokenizer"
    )


def test_open_clip_builds_the_same_model_as_fgcmr(tokenizer, tmp_path, monkeypatch):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_cfg = load_model_config("tiny")
    name, model_dir = peer.write_peer_model(model_cfg, tokenizer, tmp_path)
    variant = json.loads((model_dir / peer.TIMM_VARIANT).read_text())
    peer.register_timm_variant(variant["name"], variant["base"], variant["model_kwargs"])
    open_clip.add_model_config(model_dir)
    theirs = open_clip.create_model(name)  # loads the random text weights saved beside the config
    ours = build_model(peer.pin_tokenizer(model_cfg, tokenizer))

    def shapes(model):
        tensors = [
            *model.parameters(),
            *(b for b in model.buffers() if b.is_floating_point()),
        ]  # BatchNorm statistics too
        return sorted(tuple(t.shape) if t.ndim else (1,) for t in tensors)

    assert shapes(theirs) == shapes(ours)  # same towers, same heads; only names differ
    size = model_cfg.image.image_size
    ids = open_clip.get_tokenizer(name)(["a red circle on a blue field", "a star"])
    assert ids.shape == (2, model_cfg.text.max_length)
    image_emb, text_emb, _ = theirs(torch.randn(2, 3, size, size), ids)
    assert image_emb.shape == text_emb.shape == (2, model_cfg.embed_dim)


def test_shard_pattern_is_a_brace_range_for_numbered_shards(tmp_path):
    shards = [tmp_path / f"train-{i:06d}.tar" for i in range(3, 6)]
    assert peer.shard_pattern(shards) == f"{tmp_path}/train-{{000003..000005}}.tar"
    assert peer.shard_pattern(shards[:1]) == str(shards[0])
    gap = [shards[0], shards[2]]
    assert peer.shard_pattern(gap) == f"{shards[0]}::{shards[2]}"


def test_throughput_counts_only_steps_after_warmup():
    points = [(0.0, 1), (10.0, 5), (12.0, 10), (14.0, 15), (15.0, 20)]
    r = peer.throughput(points, warmup=10, global_batch=64)
    assert r["measured_steps"] == 10
    assert r["samples_per_s"] == pytest.approx(10 * 64 / 3.0)
    assert r["window_samples_per_s"] == pytest.approx([5 * 64 / 2.0, 5 * 64 / 1.0])
    with pytest.raises(RuntimeError, match="two progress lines"):
        peer.throughput(points, warmup=16, global_batch=64)


def test_log_patterns_match_both_trainers():
    oc = "2026-11-28,13:37:11 | INFO | Train Epoch: 0 [ 384/1920 (20%)] Data (t): 0.013 Batch (t): 0.376, 191.999/s"
    fg = "13:38:50 [rank0] fgcmr.train: step 10/40 loss 4.2532 lr 5.00e-04 178.3 samples/s step 0.359s"
    assert peer.OPEN_CLIP_LINE.search(oc).group(1) == "384"
    assert peer.FGCMR_LINE.search(fg).group(1) == "10"


def test_config_rejects_unknown_peer_and_too_few_steps():
    with pytest.raises(ValueError, match="only peer"):
        peer.BenchPeerConfig(peer="other").validate()
    with pytest.raises(ValueError, match="two progress lines"):
        peer.BenchPeerConfig(steps=12, warmup=10, log_every=5).validate()


@pytest.mark.slow
def test_open_clip_trainer_runs_on_our_shards(synthetic_dataset, tokenizer, tmp_path):
    """One real 2-process gloo run of open_clip_train on fgcmr's shards, timed from its progress lines."""
    cfg = peer.BenchPeerConfig(nproc=2, micro_batch=8, steps=12, warmup=2, log_every=2, workers=1)
    r = peer.run_open_clip_peer(cfg, synthetic_dataset, tmp_path, tokenizer)
    # open_clip logs after steps 1, 3, 5, …, 11 and the last (12): measured from step 3 (first ≥ warmup) to 12
    assert r["processes"] == 2 and r["measured_steps"] == 9
    assert r["samples_per_s"] > 0
    log = Path(r["log"]).read_text()
    assert "Contrastive_loss" in log and re.search(r"\[\s*192/192", log)
