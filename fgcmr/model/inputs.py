"""Turn a shard ``Sample`` into model inputs: decoded + transformed image, tokenised text, or features.

The image transform is timm's own for the tower's model (its size, crop, mean/std), the training
augmentation when ``train=True``. It stops at uint8 pixels (timm's "prefetcher" form): DataLoader
workers pass 4× fewer bytes and skip the float conversion, which ``normalize`` does once per batch,
on the device, with the same arithmetic as torchvision's ToTensor + Normalize. Pure CPU work, safe
in DataLoader workers (picklable).
"""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING

import numpy as np
import torch

from fgcmr.dataset import Sample
from fgcmr.model.config import ModelConfig
from fgcmr.model.tfidf import TfidfEncoder
from fgcmr.text import load_tokenizer

if TYPE_CHECKING:
    from fgcmr.model.two_tower import TextBatch, TwoTower


def image_data_config(cfg: ModelConfig) -> dict:
    """timm's data config (input size, interpolation, mean/std, crop) for the image tower's model: the one
    stored in the config (an export's), else timm's for the model name."""
    if cfg.image.preprocess:
        data = dict(cfg.image.preprocess)
        return {**data, **{k: tuple(data[k]) for k in ("input_size", "mean", "std") if k in data}}
    import timm
    from timm.data import resolve_data_config

    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.image.name, allow_unregistered=False)
    if pretrained_cfg is None:
        raise ValueError(f"timm does not know the model {cfg.image.name!r}")
    args = {"input_size": (3, cfg.image.image_size, cfg.image.image_size)} if cfg.image.image_size else {}
    return resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict())


class Inputs:
    def __init__(self, cfg: ModelConfig, train: bool = False):
        self.cfg = cfg
        self.transform = None
        if cfg.image.kind == "timm":
            from timm.data import create_transform

            data_cfg = image_data_config(cfg)
            self.transform = create_transform(**data_cfg, is_training=train, use_prefetcher=True)
            self.mean, self.std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
        self.tokenizer = None
        if cfg.text.kind == "transformers":
            if not cfg.tokenizer_dir:
                raise ValueError("the text tower needs a tokenizer: set text.tokenizer_dir or text.pretrained_dir")
            self.tokenizer = load_tokenizer(cfg.tokenizer_dir)
            # The Rust tokenizer directly: same ids as ``tokenizer(text, truncation=True)``, ~4× less overhead per text.
            self._encoder = self.tokenizer.backend_tokenizer
            self._encoder.enable_truncation(cfg.max_text_length)
            self._encoder.no_padding()
        self.tfidf = None
        if cfg.text.kind == "tfidf":
            if not cfg.tokenizer_dir:
                raise ValueError("the tfidf text tower needs its fitted vectoriser: set text.tokenizer_dir")
            self.tfidf = TfidfEncoder.load(cfg.tokenizer_dir)

    def pixels(self, sample: Sample) -> torch.Tensor:
        """uint8 ``[3, H, W]`` from the image bytes (format detected from content), or the ``img.npy``
        feature (fp32)."""
        if self.transform is None:
            if sample.image_feature is None:
                raise ValueError(f"sample {sample.key}: the image tower needs an img.npy feature")
            return torch.from_numpy(np.asarray(sample.image_feature, dtype=np.float32).reshape(-1))
        if sample.image is None:
            raise ValueError(f"sample {sample.key}: no image bytes")
        from PIL import Image

        with Image.open(io.BytesIO(sample.image)) as im:
            return self.transform(im if im.mode == "RGB" else im.convert("RGB"))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``[..., 3, H, W]`` → fp32 ``(x / 255 − mean) / std`` on their device;
        features pass as they are."""
        if images.dtype != torch.uint8:
            return images
        mean = torch.tensor(self.mean, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(3, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std)

    def image(self, sample: Sample) -> torch.Tensor:
        """The image tower's fp32 input for one sample (``normalize(pixels(sample))``)."""
        return self.normalize(self.pixels(sample))

    def text(self, sample: Sample, k: int) -> torch.Tensor:
        """The k-th text of the sample: token ids ``[L]`` (≤ max length), its TF-IDF vector, or its ``txt.npy``
        feature row."""
        if self.tfidf is not None:
            return torch.from_numpy(self.tfidf.encode(sample.texts[k]))
        if self.tokenizer is None:
            feat = sample.text_feature
            if feat is None:
                raise ValueError(f"sample {sample.key}: the text tower needs a txt.npy feature")
            feat = np.asarray(feat, dtype=np.float32)
            return torch.from_numpy(feat[k] if feat.ndim == 2 else feat.reshape(-1))
        return torch.tensor(self._encoder.encode(sample.texts[k]).ids, dtype=torch.long)

    def num_texts(self, sample: Sample) -> int:
        """How many texts the text tower sees for a sample: its captions, or the rows of its ``txt.npy`` feature."""
        if self.cfg.text.kind == "feature" and sample.text_feature is not None:
            return 1 if sample.text_feature.ndim == 1 else len(sample.text_feature)
        return len(sample.texts)

    def item(self, sample: Sample) -> tuple[Sample, torch.Tensor, list[torch.Tensor]]:
        """One sample for a ``Batch``: its pixels (or image feature) and every text the tower sees."""
        return sample, self.pixels(sample), [self.text(sample, k) for k in range(self.num_texts(sample))]

    def collate_texts(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor] | torch.Tensor:
        """Pad token ids to the longest in the batch (with an attention mask), or stack features."""
        if self.tokenizer is None:
            return torch.stack(items)
        length = max(len(t) for t in items)
        ids = torch.full((len(items), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, t in enumerate(items):
            ids[i, : len(t)] = t
            mask[i, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def build_inputs(cfg: ModelConfig, train: bool = False) -> Inputs:
    return Inputs(cfg, train=train)


@dataclasses.dataclass
class Batch:
    """Samples for the towers: ``images`` uint8 pixels (or fp32 features) ``[b, ...]``, ``texts`` every text of
    every sample in sample order (``n_texts`` per sample), not yet collated."""

    samples: list[Sample]
    images: torch.Tensor
    texts: list[torch.Tensor] | TextBatch  # collated once ``ready``
    n_texts: list[int]
    collated: bool = False

    @classmethod
    def of(cls, items: list[tuple[Sample, torch.Tensor, list[torch.Tensor]]]) -> Batch:
        """From ``Inputs.item`` results."""
        return cls(
            [s for s, _, _ in items],
            torch.stack([p for _, p, _ in items]),
            [t for _, _, ts in items for t in ts],
            [len(ts) for _, _, ts in items],
        )

    def ready(self, inputs: Inputs, device: torch.device) -> Batch:
        """The batch as the towers take it, so that a reader thread does this work off the forward loop: texts
        collated; pixels normalised on a CPU ``device``, or left uint8 in pinned memory for a GPU (a
        non-blocking copy of 4× fewer bytes, normalised there)."""
        images = self.images
        if device.type == "cpu":
            images = inputs.normalize(images)
        elif device.type == "cuda":
            images = images.pin_memory()
        return dataclasses.replace(self, images=images, texts=inputs.collate_texts(self.texts), collated=True)


def move(x: TextBatch, device: torch.device, dtype: torch.dtype | None = None) -> TextBatch:
    """A tensor or a collated text batch on ``device``; floating tensors (pixels, features) take ``dtype`` when
    given (the engine's compute dtype), token ids and masks keep theirs."""
    if isinstance(x, dict):
        return {k: move(v, device, dtype) for k, v in x.items()}
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


def embed_batch(
    model: TwoTower, inputs: Inputs, batch: Batch, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of one batch (fp32, on the device); the caller picks no_grad or inference_mode."""
    images = move(inputs.normalize(batch.images.to(device, non_blocking=True)), device, dtype)  # no-op if done
    texts = move(batch.texts if batch.collated else inputs.collate_texts(batch.texts), device, dtype)
    return model.encode_image(images).float(), model.encode_text(texts).float()
