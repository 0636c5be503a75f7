"""Batched embedding of many texts: tokenise, sort by length, run the encoder, restore the order.

Sorting by token length keeps padding small, which is most of the speed on real text; mean pooling
ignores padding, so the result does not depend on how texts were grouped into batches.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from fgcmr.label.model import SiameseLabeler, autocast, clip_chars

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def length_batches(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int) -> list[Batch]:
    """(positions in ``texts``, padded batch) in order of decreasing token length."""
    ids = tokenizer(clip_chars(texts, max_length), truncation=True, max_length=max_length, return_token_type_ids=False, return_attention_mask=False)["input_ids"]
    batches = []
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(ids[rows[0]])
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        batches.append((torch.tensor(rows), {"input_ids": input_ids, "attention_mask": mask}))
    return batches


@torch.inference_mode()
def embed_batches(model: SiameseLabeler, batches: list[Batch], n: int, device: torch.device, dtype: str = "auto") -> torch.Tensor:
    """Normalised fp32 embeddings [n, dim] on the CPU, rows placed by each batch's positions."""
    out = torch.empty((n, model.proj.out_features), dtype=torch.float32)
    with autocast(device, dtype):
        for rows, batch in batches:
            out[rows] = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).float().cpu()
    return out


def embed_texts(model: SiameseLabeler, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                batch_size: int, device: torch.device, dtype: str = "auto") -> torch.Tensor:
    """Normalised fp32 embeddings [len(texts), dim] on the CPU, in the order of ``texts``."""
    return embed_batches(model, length_batches(tokenizer, texts, max_length, batch_size), len(texts), device, dtype)
