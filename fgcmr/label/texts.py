"""Texts and their relevance groups, read through the shard seam.

Every text keeps its image's category (−1 when the data set has none) and its image index, so the
pair targets are exactly ``fgcmr.labels.relevance``: same category, or same image without categories.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.labels import relevance


@dataclasses.dataclass
class TextSet:
    texts: list[str]
    category: np.ndarray  # int64 [T], −1 = none
    image: np.ndarray  # int64 [T], index of the text's image

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "TextSet":
        return TextSet([self.texts[i] for i in idx], self.category[idx], self.image[idx])

    def targets(self) -> torch.Tensor:
        """``y[i, j]`` for every text pair of this set."""
        cat, img = torch.from_numpy(self.category), torch.from_numpy(self.image)
        return relevance(cat, cat, img, img)

    def split_by_image(self, fraction: float, seed: int) -> tuple["TextSet", "TextSet"]:
        """Carve ``fraction`` of the images (with all their texts) off as a held-out part."""
        images = np.unique(self.image)
        held = np.random.default_rng(seed).permutation(images)[: max(1, round(fraction * len(images)))]
        mask = np.isin(self.image, held)
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))


def read_texts(dataset_dir: str | Path, splits: list[str]) -> TextSet:
    """All texts of the given splits, in shard order; image indices are unique across splits."""
    ds = open_dataset(dataset_dir)
    texts: list[str] = []
    cats: list[int] = []
    imgs: list[int] = []
    n_images = 0
    for split in splits:
        for shard in ds.shards(split):
            for sample in iter_samples(shard):
                cat = sample.category_id
                for text in sample.texts:
                    texts.append(text)
                    cats.append(cat)
                    imgs.append(n_images)
                n_images += 1
    return TextSet(texts, np.asarray(cats, dtype=np.int64), np.asarray(imgs, dtype=np.int64))
