"""Periodic retrieval scalars during training (TensorBoard ``val/*``), so a run shows whether it
is learning long before ``fgcmr eval`` runs on the exported model.

A fixed set of held-out samples (the first ``max_images`` of a split, read once through the shard
seam) is embedded every ``eval_every`` steps. Every rank embeds the same samples — under ZeRO-3 each
forward needs every rank — and rank 0 scores them with the metric functions of
``fgcmr.evaluate.metrics`` (pure math: MAP@all by category, Recall@K by image).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from fgcmr.dataset import DatasetInfo, iter_samples
from fgcmr.evaluate.metrics import retrieval_metrics
from fgcmr.model.inputs import Inputs

log = logging.getLogger("fgcmr.train")
LOGGED = ("map_i2t", "map_t2i", "map_avg", "r1_i2t", "r1_t2i", "r10_i2t", "r10_t2i", "chance_map")


class Validator:
    def __init__(self, dataset: DatasetInfo, split: str, max_images: int, inputs: Inputs, batch_size: int = 64):
        samples = list(
            itertools.islice((s for shard in dataset.shards(split) for s in iter_samples(shard)), max_images)
        )
        if not samples:
            raise ValueError(f"validation split {split!r} of {dataset.root} has no samples")
        texts_per_sample = [1 if inputs.tokenizer is None else len(s.texts) for s in samples]
        self.images = [inputs.image(s) for s in samples]
        self.texts = [inputs.text(s, k) for s, n in zip(samples, texts_per_sample) for k in range(n)]
        self.owner = np.repeat(np.arange(len(samples)), texts_per_sample)
        self.categories = np.array([s.category_id for s in samples])
        self.inputs, self.batch_size, self.split = inputs, batch_size, split

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        was_training = module.training
        module.eval()
        try:
            img = torch.cat(
                [module.encode_image(torch.stack(b).to(device, dtype)) for b in _chunks(self.images, self.batch_size)]
            )
            txt = torch.cat(
                [
                    module.encode_text(_move(self.inputs.collate_texts(b), device, dtype))
                    for b in _chunks(self.texts, self.batch_size)
                ]
            )
        finally:
            module.train(was_training)
        metrics = retrieval_metrics(img.float().cpu().numpy(), txt.float().cpu().numpy(), self.categories, self.owner)
        return {k: float(metrics[k]) for k in LOGGED}


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _move(text: dict | torch.Tensor, device: torch.device, dtype: torch.dtype):
    if isinstance(text, dict):
        return {k: v.to(device) for k, v in text.items()}
    return text.to(device, dtype)
