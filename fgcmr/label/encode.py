"""Batched embedding of many texts: tokenise, sort by length, run the encoder, restore the order.

Sorting by token length keeps padding small, which is most of the speed on real text; mean pooling
ignores padding, so the result does not depend on how texts were grouped into batches.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fgcmr.label.model import SiameseLabeler, autocast, clip_chars

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


QUICK_CHARS_PER_TOKEN = 5


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of ``texts`` truncated to ``max_length``, as from the text cut by ``clip_chars``, for half the work.

    Each text is first tokenised cut at ``QUICK_CHARS_PER_TOKEN × max_length`` characters. Cutting a
    text changes only the word it cuts, so that result stands when the text filled ``max_length``
    tokens and all of them end before the last whitespace of the cut (nearly every long text); the
    others are tokenised again, cut by ``clip_chars``.
    """
    limit = QUICK_CHARS_PER_TOKEN * max_length
    cut = [t[:limit] for t in texts]
    enc = tokenizer(
        cut,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_token_type_ids=False,
        return_attention_mask=False,
    )
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    redo = [
        i
        for i, t in enumerate(texts)
        if len(t) > limit
        and not (len(ids[i]) == max_length and max(end for _, end in offsets[i]) <= _last_space(cut[i]))
    ]
    if redo:
        again = tokenizer(
            clip_chars([texts[i] for i in redo], max_length),
            truncation=True,
            max_length=max_length,
            return_token_type_ids=False,
            return_attention_mask=False,
        )["input_ids"]
        for i, x in zip(redo, again):
            ids[i] = x
    return ids


def _last_space(text: str) -> int:
    """Index of the last whitespace character (−1 if none)."""
    m = _LAST_SPACE.search(text)
    return m.start() if m else -1


_LAST_SPACE = re.compile(r"\s\S*\Z")


def length_batches(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int, first: int = 0
) -> list[Batch]:
    """(positions in ``texts`` plus ``first``, padded batch) in order of decreasing token length."""
    ids = token_ids(tokenizer, texts, max_length)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows[0]])
        mask = np.arange(width) < lengths[rows, None]
        input_ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.concatenate([ids[i] for i in rows])
        batches.append(
            (
                torch.from_numpy(rows + first),
                {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))},
            )
        )
    return batches


@torch.inference_mode()
def encode_batch(
    model: SiameseLabeler, batch: dict[str, torch.Tensor], device: torch.device, dtype: str = "auto"
) -> torch.Tensor:
    """Normalised fp32 embeddings of one padded batch, on the CPU."""
    with autocast(device, dtype):
        return model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).float().cpu()


def embed_batches(
    model: SiameseLabeler, batches: list[Batch], n: int, device: torch.device, dtype: str = "auto"
) -> torch.Tensor:
    """Normalised fp32 embeddings [n, dim] on the CPU, rows placed by each batch's positions."""
    out = torch.empty((n, model.proj.out_features), dtype=torch.float32)
    for rows, batch in batches:
        out[rows] = encode_batch(model, batch, device, dtype)
    return out


def embed_texts(
    model: SiameseLabeler,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int,
    device: torch.device,
    dtype: str = "auto",
) -> torch.Tensor:
    """Normalised fp32 embeddings [len(texts), dim] on the CPU, in the order of ``texts``."""
    return embed_batches(model, length_batches(tokenizer, texts, max_length, batch_size), len(texts), device, dtype)
