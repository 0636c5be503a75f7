"""The text tower's tokenizer: binding one to a text-tower config, and fitting one when the model has none.

The vocabulary size lives in one place, the transformers ``config["vocab_size"]`` (the embedding's rows):
a tokenizer fitted on the corpus aims at it, and binding a tokenizer sets it to that tokenizer's size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from fgcmr.model.config import TextTowerConfig, resolve_path
from fgcmr.text import ensure_tokenizer, load_tokenizer


def bind_tokenizer(text: TextTowerConfig, tokenizer_dir: str | Path) -> TextTowerConfig:
    """``text`` reading ``tokenizer_dir``, its embedding built for exactly that tokenizer's vocabulary."""
    config = {**text.config, "vocab_size": len(load_tokenizer(resolve_path(str(tokenizer_dir))))}
    return dataclasses.replace(text, tokenizer_dir=str(tokenizer_dir), config=config)


def fit_tokenizer(text: TextTowerConfig, texts: Iterable[str], out_dir: str | Path) -> TextTowerConfig:
    """``text`` bound to a WordPiece tokenizer fitted on ``texts`` in ``out_dir`` (kept if one is there),
    of at most ``config["vocab_size"]`` tokens, every piece of the corpus kept (no minimum frequency)."""
    return bind_tokenizer(text, ensure_tokenizer(texts, out_dir, text.config["vocab_size"], min_frequency=0))
