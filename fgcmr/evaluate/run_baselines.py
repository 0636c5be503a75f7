"""The classical baselines on a sharded dataset, scored on the very test samples the model was scored on.

Inputs are the dataset's own: image features (``img.npy``), or for datasets of pixels the pooled
features of the run's own image tower *as it was before training* (its pretrained weights, frozen:
what a classical method could have used; a tower trained from scratch has none, and the baselines
are then skipped with a note); texts as TF-IDF (character 1–2-grams for CJK text), and — for CCA,
when the shards carry them — the published text features (``txt.npy``, e.g. Wikipedia's 10-d LDA),
else an LSA reduction of TF-IDF. Fitted on ``baseline_train_split``; hyperparameters by
cross-validation on that split only.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from fgcmr.dataset import DatasetInfo, Sample, iter_samples
from fgcmr.evaluate import baselines as B
from fgcmr.evaluate.metrics import retrieval_metrics

log = logging.getLogger("fgcmr.eval")
LSA_DIM = 100


ImageFeatures = Callable[[Iterable[Sample]], Iterable[tuple[Sample, np.ndarray | None]]]


def stored_features(samples: Iterable[Sample]) -> Iterable[tuple[Sample, np.ndarray | None]]:
    for sample in samples:
        yield sample, None if sample.image_feature is None else np.asarray(sample.image_feature, np.float64).reshape(-1)


def frozen_tower_features(run_dir: Path, batch_size: int = 32) -> ImageFeatures | None:
    """Pooled features of the run's image tower with its pretrained weights (None: no pretrained timm tower)."""
    from fgcmr.config import build, read_yaml
    from fgcmr.model.config import ModelConfig
    from fgcmr.model.inputs import image_data_config
    from fgcmr.model.towers import build_image_tower

    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    cfg = build(ModelConfig, read_yaml(config)["model"], "model")
    if cfg.image.kind != "timm" or not (cfg.image.pretrained or cfg.image.checkpoint):
        return None
    from PIL import Image
    from timm.data import create_transform

    tower = build_image_tower(cfg.image).eval()
    transform = create_transform(**image_data_config(cfg), is_training=False)

    @torch.no_grad()
    def features(samples: Iterable[Sample]) -> Iterable[tuple[Sample, np.ndarray | None]]:
        batch: list[tuple[Sample, torch.Tensor]] = []
        for sample in [*samples, None]:
            if sample is not None and sample.image is not None:
                with Image.open(io.BytesIO(sample.image)) as im:
                    batch.append((sample, transform(im.convert("RGB"))))
            if batch and (sample is None or len(batch) == batch_size):
                out = tower(torch.stack([x for _, x in batch])).double().numpy()
                yield from ((s, f) for (s, _), f in zip(batch, out))
                batch = []

    return features


def _train_split(dataset: DatasetInfo, split: str, image_features: ImageFeatures) -> dict:
    img, txt_feat, texts, owner, cat = [], [], [], [], []
    for path in dataset.shards(split):
        for sample, feature in image_features(iter_samples(path)):
            if feature is None:
                return {}
            i = len(img)
            img.append(feature)
            cat.append(sample.category_id)
            texts.extend(sample.texts)
            owner.extend([i] * len(sample.texts))
            txt_feat.append(
                None if sample.text_feature is None else np.asarray(sample.text_feature, np.float64).reshape(-1)
            )
    return (
        {
            "img": np.stack(img),
            "cat": np.array(cat),
            "texts": texts,
            "owner": np.array(owner),
            "txt_feat": np.stack(txt_feat) if all(f is not None for f in txt_feat) and len(texts) == len(img) else None,
        }
        if img
        else {}
    )


def baseline_metrics(dataset: DatasetInfo, cfg, emb) -> dict:
    """``{"cca": metrics, "semantic_matching": metrics}`` (flat metric dicts without curves), or a skip note."""
    started = time.time()
    image_features, image_input = stored_features, "img.npy features"
    test_img = emb.img_feat
    if test_img is None:
        image_features = frozen_tower_features(Path(cfg.run))
        if image_features is None:
            return {
                "skipped": "the dataset holds images and the image tower has no pretrained weights "
                "to take frozen features from"
            }
        image_input = "frozen pretrained image tower"
        by_key = {s.key: f for path in dataset.shards(cfg.split) for s, f in image_features(iter_samples(path))}
        test_img = np.stack([by_key[k] for k in emb.keys])
    train = _train_split(dataset, cfg.baseline_train_split, image_features)
    if not train:
        return {"skipped": f"split {cfg.baseline_train_split!r} has no image features"}
    img = B.dense_features(train["img"], test_img, hellinger=cfg.baseline_hellinger)
    tfidf = B.tfidf_features(train["texts"], emb.texts)
    one_text_each = len(emb.txt_owner) == len(emb.keys)
    if train["txt_feat"] is not None and emb.txt_feat is not None and one_text_each:
        cca_text, cca_text_name = B.dense_features(train["txt_feat"], emb.txt_feat), "txt.npy features"
    else:
        cca_text, cca_text_name = B.svd_features(tfidf, LSA_DIM), f"LSA-{LSA_DIM} of TF-IDF"
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # sklearn's multi_class deprecation notice
        i_cca, t_cca = B.cca(img, cca_text, train["owner"], dim=cfg.baseline_cca_dim)
        out["cca"] = _score(
            i_cca, t_cca, emb, {"image_input": image_input, "text_input": cca_text_name, "dim": cfg.baseline_cca_dim}
        )
        if (train["cat"] >= 0).all():
            i_sm, t_sm, info = B.semantic_matching(img, tfidf, train["cat"], train["cat"][train["owner"]])
            out["semantic_matching"] = _score(
                i_sm, t_sm, emb, {"image_input": image_input, "text_input": "TF-IDF", **info}
            )
        else:
            out["semantic_matching"] = {"skipped": "needs categories"}
    log.info(
        "baselines in %.0fs: %s",
        time.time() - started,
        {k: round(v.get("map_avg", float("nan")), 4) for k, v in out.items()},
    )
    return out


def _score(img: np.ndarray, txt: np.ndarray, emb, info: dict) -> dict:
    m = retrieval_metrics(img, txt, emb.img_cat, emb.txt_owner)
    return {**{k: v for k, v in m.items() if not k.startswith("pr_")}, **info}
