"""The text tower's tokenizer: binding one to a text-tower config, and fitting one when the model has none.

The vocabulary size lives in one place, the transformers ``config["vocab_size"]`` (the embedding's rows):
a tokenizer fitted on the corpus aims at it, and binding a tokenizer sets it to that tokenizer's size.
A ``tfidf`` tower's vectoriser is its tokenizer: ``feature_dim`` caps its vocabulary when fitted and is its
exact size once bound.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from fgcmr.model.config import TextTowerConfig, resolve_path
from fgcmr.model.tfidf import TFIDF_FILE, TfidfEncoder
from fgcmr.text import TOKENIZER_FILE, ensure_tokenizer, load_tokenizer


def bind_tokenizer(text: TextTowerConfig, tokenizer_dir: str | Path) -> TextTowerConfig:
    """``text`` reading ``tokenizer_dir``, its embedding built for exactly that tokenizer's vocabulary."""
    if text.kind == "tfidf":
        dim = TfidfEncoder.load(resolve_path(str(tokenizer_dir))).dim
        return dataclasses.replace(text, tokenizer_dir=str(tokenizer_dir), feature_dim=dim)
    config = {**text.config, "vocab_size": len(load_tokenizer(resolve_path(str(tokenizer_dir))))}
    return dataclasses.replace(text, tokenizer_dir=str(tokenizer_dir), config=config)


def fit_tokenizer(text: TextTowerConfig, texts: Iterable[str], out_dir: str | Path) -> TextTowerConfig:
    """``text`` bound to a WordPiece tokenizer fitted on ``texts`` in ``out_dir`` (kept if one is there),
    of at most ``config["vocab_size"]`` tokens, every piece of the corpus kept (no minimum frequency); for a
    ``tfidf`` tower a TF-IDF vectoriser of the ``feature_dim`` most frequent terms."""
    if text.kind == "tfidf":
        if not (Path(out_dir) / TFIDF_FILE).is_file():
            TfidfEncoder.fit(list(texts), text.feature_dim).save(out_dir)
        return bind_tokenizer(text, out_dir)
    return bind_tokenizer(text, ensure_tokenizer(texts, out_dir, text.config["vocab_size"], min_frequency=0))


def tokenizer_file(text: TextTowerConfig) -> str:
    """The file whose presence marks a whole fitted tokenizer (or vectoriser) in its directory."""
    return TFIDF_FILE if text.kind == "tfidf" else TOKENIZER_FILE
