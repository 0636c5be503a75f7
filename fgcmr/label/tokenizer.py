"""``fgcmr label tokenizer``: fit the labeler's WordPiece tokenizer (``fgcmr.text``) on a split's texts."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fgcmr.config import dump_yaml
from fgcmr.io import atomic_write_text
from fgcmr.label.config import TokenizerConfig, tokenizer_fingerprint
from fgcmr.run import clear_stamp, write_stamp
from fgcmr.text import ensure_tokenizer, load_tokenizer

log = logging.getLogger("fgcmr.label")


def run(cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """``fgcmr label tokenizer``: train on one split's texts and save beside the resolved config."""
    from fgcmr.label.texts import read_texts

    clear_stamp(Path(cfg.out))
    texts = read_texts(cfg.shards, [cfg.split]).texts
    tok = load_tokenizer(ensure_tokenizer(texts, cfg.out, cfg.vocab_size, cfg.min_frequency, cfg.lowercase, refit=True))
    atomic_write_text(Path(cfg.out) / "config.yaml", dump_yaml(cfg))
    write_stamp(Path(cfg.out), tokenizer_fingerprint(cfg))
    log.info("tokenizer: %d tokens from %d %s texts → %s", len(tok), len(texts), cfg.split, cfg.out)
    return tok
