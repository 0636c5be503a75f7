"""``fgcmr label tokenizer``: fit the labeler's WordPiece tokenizer (``fgcmr.text``) on a split's texts."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fgcmr.config import Validated, dump_yaml
from fgcmr.io import atomic_write_text
from fgcmr.run import Check, Fingerprint, check_stamp, clear_stamp, file_hash, fingerprint, write_stamp
from fgcmr.text import SPECIAL_TOKENS, ensure_tokenizer, load_tokenizer

log = logging.getLogger("fgcmr.label")


@dataclasses.dataclass
class TokenizerConfig(Validated):
    shards: str  # dataset dir (fgcmr shard output)
    out: str  # tokenizer dir written
    vocab_size: int = 8000  # WordPiece vocabulary size
    min_frequency: int = 2  # words seen fewer times are not in it
    lowercase: bool = True  # lowercase texts first
    split: str = "train"  # the split whose texts it is fitted on

    def validate(self) -> None:
        if self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size={self.vocab_size} is too small")


def tokenizer_fingerprint(cfg: TokenizerConfig) -> Fingerprint:
    return fingerprint("tokenizer", cfg, {"manifest": file_hash(Path(cfg.shards) / "manifest.json")}, ("out",))


def done(cfg: TokenizerConfig) -> Check:
    return check_stamp(Path(cfg.out), tokenizer_fingerprint(cfg), "tokenizer")


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
