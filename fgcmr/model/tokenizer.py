"""The text tower's tokenizer, when its model has none: WordPiece fitted on the corpus and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from fgcmr.text import train_wordpiece as fit_wordpiece


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8000) -> Path:
    """Fit a BERT-style WordPiece vocabulary and save it as a transformers tokenizer directory."""
    out_dir = Path(out_dir)
    fit_wordpiece(texts, vocab_size, min_frequency=0).save_pretrained(str(out_dir))
    return out_dir
