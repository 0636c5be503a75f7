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
from fgcmr.model.inputs import Batch, Inputs, embed_batch
from fgcmr.model.two_tower import TwoTower
from fgcmr.runtime.monitor import Monitor

log = logging.getLogger("fgcmr.train")
LOGGED = ("map_i2t", "map_t2i", "map_avg", "r1_i2t", "r1_t2i", "r10_i2t", "r10_t2i", "chance_map")


def validation_split(dataset: DatasetInfo, requested: str | None) -> str:
    """The split periodic validation embeds: the one asked for, else the validation carve ``val`` where the
    dataset has one (``fgcmr shard --holdout.fraction``), else ``test``: choices are made on ``val``."""
    if requested:
        return requested
    return "val" if "val" in dataset.split_names else "test"


class Validator:
    """The held-out samples, embedded like ``fgcmr embed`` / ``fgcmr eval`` do (``Batch``, ``embed_batch``), and
    when to score them: every ``every`` steps and at the last (``maybe``)."""

    def __init__(
        self, dataset: DatasetInfo, split: str, max_images: int, inputs: Inputs, every: int, batch_size: int = 64
    ):
        samples = list(
            itertools.islice((s for shard in dataset.shards(split) for s in iter_samples(shard)), max_images)
        )
        if not samples:
            raise ValueError(f"validation split {split!r} of {dataset.root} has no samples")
        items = [inputs.item(s) for s in samples]
        self.batches = [Batch.of(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
        self.owner = np.repeat(np.arange(len(samples)), [len(texts) for _, _, texts in items])
        self.categories = np.array([s.category_id for s in samples])
        self.inputs, self.split, self.every = inputs, split, every

    def maybe(
        self, step: int, total_steps: int, module: TwoTower, device: torch.device, dtype: torch.dtype, monitor: Monitor
    ) -> dict[str, float] | None:
        """Score at every ``every``-th step and the last one: ``val/*`` scalars and a log line."""
        if step % self.every and step != total_steps:
            return None
        scores = self(module, device, dtype)
        monitor.scalars("val", scores, step)
        log.info(
            "step %d: validation on split %r: MAP@all %.4f (chance %.4f), R@1 i→t %.3f t→i %.3f",
            step,
            self.split,
            scores["map_avg"],
            scores["chance_map"],
            scores["r1_i2t"],
            scores["r1_t2i"],
        )
        return scores

    @torch.no_grad()
    def __call__(self, module: TwoTower, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        was_training = module.training
        module.eval()
        try:
            img, txt = zip(*(embed_batch(module, self.inputs, b, device, dtype) for b in self.batches))
        finally:
            module.train(was_training)
        metrics = retrieval_metrics(
            torch.cat(img).cpu().numpy(), torch.cat(txt).cpu().numpy(), self.categories, self.owner
        )
        return {k: float(metrics[k]) for k in LOGGED}
