"""The classical baselines on a sharded dataset, scored on the very test samples the model was scored on.

Inputs are the dataset's own: image features (``img.npy``; datasets of pixels have none, and the
baselines are then skipped with a note), texts as TF-IDF, and — for CCA, when the shards carry them —
the published text features (``txt.npy``, e.g. Wikipedia's 10-d LDA), else an LSA reduction of TF-IDF.
Fitted on ``baseline_train_split``; hyperparameters by cross-validation on that split only.
"""
from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from fgcmr.dataset import DatasetInfo, iter_samples
from fgcmr.evaluate import baselines as B
from fgcmr.evaluate.metrics import retrieval_metrics

log = logging.getLogger("fgcmr.eval")
LSA_DIM = 100


def _train_split(dataset: DatasetInfo, split: str) -> dict:
    img, txt_feat, texts, owner, cat = [], [], [], [], []
    for path in dataset.shards(split):
        for sample in iter_samples(path):
            if sample.image_feature is None:
                return {}
            i = len(img)
            img.append(np.asarray(sample.image_feature, np.float64).reshape(-1))
            cat.append(-1 if sample.category is None else int(sample.category))
            texts.extend(sample.texts)
            owner.extend([i] * len(sample.texts))
            txt_feat.append(None if sample.text_feature is None else np.asarray(sample.text_feature, np.float64).reshape(-1))
    return {
        "img": np.stack(img), "cat": np.array(cat), "texts": texts, "owner": np.array(owner),
        "txt_feat": np.stack(txt_feat) if all(f is not None for f in txt_feat) and len(texts) == len(img) else None,
    } if img else {}


def baseline_metrics(dataset: DatasetInfo, cfg, emb) -> dict:
    """``{"cca": metrics, "semantic_matching": metrics}`` (flat metric dicts without curves), or a skip note."""
    if emb.img_feat is None:
        return {"skipped": "the dataset holds images, not image features"}
    train = _train_split(dataset, cfg.baseline_train_split)
    if not train:
        return {"skipped": f"split {cfg.baseline_train_split!r} has no image features"}
    started = time.time()
    img = B.dense_features(train["img"], emb.img_feat, hellinger=cfg.baseline_hellinger)
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
        out["cca"] = _score(i_cca, t_cca, emb, {"text_input": cca_text_name, "dim": cfg.baseline_cca_dim})
        if (train["cat"] >= 0).all():
            i_sm, t_sm, info = B.semantic_matching(img, tfidf, train["cat"], train["cat"][train["owner"]])
            out["semantic_matching"] = _score(i_sm, t_sm, emb, {"text_input": "TF-IDF", **info})
        else:
            out["semantic_matching"] = {"skipped": "needs categories"}
    log.info("baselines in %.0fs: %s", time.time() - started, {k: round(v.get("map_avg", float("nan")), 4) for k, v in out.items()})
    return out


def _score(img: np.ndarray, txt: np.ndarray, emb, info: dict) -> dict:
    m = retrieval_metrics(img, txt, emb.img_cat, emb.txt_owner)
    return {**{k: v for k, v in m.items() if not k.startswith("pr_")}, **info}
