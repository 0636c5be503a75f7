"""Text encoding without a model hub: WordPiece trained offline or a local tokenizer directory, and the
pooling of an encoder's token states into one vector per text.

Shared by the labeler and the text tower (a library, not a stage). The trained tokenizer uses
BERT's normalizer and pre-tokenizer, which put spaces around every CJK character, so Chinese text
becomes one token per character instead of one unknown token per sentence.

The vocabulary is learnt by ``fgcmr.wordpiece`` (deterministically, unlike ``tokenizers``' trainer).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fgcmr.io import make_temp_dir
from fgcmr.wordpiece import PREFIX, wordpiece_vocab


def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True
) -> PreTrainedTokenizerFast:
    """Fit a BERT-style WordPiece tokenizer on ``texts`` (English and CJK alike), deterministically."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter = Counter()
    for text in texts:
        word_counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = wordpiece_vocab(word_counts, vocab_size, min_frequency)
    tok = Tokenizer(
        models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", continuing_subword_prefix=PREFIX)
    )
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


TOKENIZER_FILE = "tokenizer.json"  # written last: a directory with it holds a whole tokenizer


def ensure_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
    refit: bool = False,
) -> Path:
    """``out_dir`` holding a WordPiece tokenizer fitted on ``texts`` (``train_wordpiece``): the one there
    already (a resumed run's; ``texts`` is then not read) unless ``refit``, else fitted and saved, its
    ``tokenizer.json`` last, so a kill mid-save leaves no tokenizer that looks whole. Every tokenizer
    fgcmr fits is fitted here."""
    out_dir = Path(out_dir)
    if (out_dir / TOKENIZER_FILE).is_file() and not refit:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TOKENIZER_FILE).unlink(missing_ok=True)
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}-")
    try:
        train_wordpiece(texts, vocab_size, min_frequency, lowercase).save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == TOKENIZER_FILE):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved with ``save_pretrained`` (ours, or a pretrained model's), read offline."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Literal["mean", "cls"]) -> torch.Tensor:
    """[B, T, H] token states → [B, H]: the first token's (``cls``), or the mean over real tokens (padding
    ignored, so a text's vector does not depend on its batch), taken in fp32 and returned in ``hidden``'s dtype."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).float()
    return ((hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)).to(hidden.dtype)
