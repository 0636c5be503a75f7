"""The two-tower retrieval model, its inputs, and its export: the API later stages build on.

- ``ModelConfig`` (``fgcmr.model.config``): ``image`` (``ImageTowerConfig``: ``kind`` timm | feature,
  timm ``name``, ``pretrained`` flag, local ``checkpoint`` file, ``model_kwargs``, ``image_size``,
  ``feature_dim``/``hidden_dim``/``feature_sqrt``/``dropout`` for the feature MLP, ``grad_checkpointing``), ``text``
  (``TextTowerConfig``: ``kind`` transformers | feature | tfidf, transformers ``config`` (with ``model_type``)
  or local ``pretrained_dir``, ``tokenizer_dir``, ``max_length``, ``pooling``, feature MLP dims,
  ``grad_checkpointing``), ``embed_dim``, ``projection_norm``; properties ``tokenizer_dir`` and ``max_text_length``.
- ``build_model(cfg) -> TwoTower``: ``encode_image(images) -> [N, D]``, ``encode_text(text_batch) -> [M, D]``
  (both L2-normalised), ``forward(images, text_batch) -> (image_emb, text_emb, logit_scale)``.
- ``build_inputs(cfg, train=False) -> Inputs``: ``image(sample) -> Tensor`` (PIL decode by content +
  timm's transform for the model, or the ``img.npy`` feature), the same as uint8 ``pixels(sample)``
  plus ``normalize(pixels)`` (once per batch, on the device), ``text(sample, k) -> Tensor`` (token ids
  of the k-th text, its TF-IDF vector, or the ``txt.npy`` feature), ``collate_texts(items) -> text_batch``.
- ``save_export(dir, model, cfg)`` / ``load_export(dir) -> (model, cfg, inputs)``: safetensors +
  ``model_config.json`` + ``tokenizer/``; loads without DeepSpeed on any world size.
- ``fit_tokenizer(text_cfg, texts, dir)``: an offline tokenizer for configs without a pretrained one, bound
  to the text tower (``bind_tokenizer(text_cfg, dir)``: its ``tokenizer_dir`` and ``config["vocab_size"]``);
  for ``kind: tfidf`` a TF-IDF vectoriser (``fgcmr.model.tfidf``, semantic matching's) of at most ``feature_dim``
  terms, which binding sets to the fitted vocabulary's size.
"""

import importlib
from typing import Any

# Each name's module, imported on first use (PEP 562) so that ``fgcmr.model.config`` (which the pipeline
# and the CLI read) costs no torch or transformers.
_HOMES = {
    "ImageTowerConfig": "fgcmr.model.config",
    "ModelConfig": "fgcmr.model.config",
    "TextTowerConfig": "fgcmr.model.config",
    "load_export": "fgcmr.model.export",
    "save_export": "fgcmr.model.export",
    "Inputs": "fgcmr.model.inputs",
    "build_inputs": "fgcmr.model.inputs",
    "bind_tokenizer": "fgcmr.model.tokenizer",
    "fit_tokenizer": "fgcmr.model.tokenizer",
    "TwoTower": "fgcmr.model.two_tower",
    "build_model": "fgcmr.model.two_tower",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
