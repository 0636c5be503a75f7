"""The public model API: ``fgcmr.load(export_dir)`` → a ``Model`` that embeds PIL images, paths and strings.

Like open_clip's ``encode_image`` / ``encode_text`` and sentence-transformers' ``encode``: inputs are
batched, preprocessed exactly as at evaluation (``Model.preprocess``, normalisation included) and
embedded in eval mode without gradients. Results are L2-normalised ``[n, d]`` float32 **numpy** arrays
(``as_tensor=True``: torch tensors on the model's device), so ``a @ b.T`` is the cosine similarity.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import torch

from fgcmr.model.export import INFO, read_export_config

ImageLike = Union["PIL.Image.Image", str, os.PathLike, bytes]  # noqa: F821


class Preprocess:
    """PIL image (or path / bytes) → the image tower's fp32 input ``[3, H, W]``: timm's eval transform
    (resize, centre crop) to uint8 pixels, then ``(x / 255 − mean) / std``. One call, nothing to forget."""

    def __init__(self, inputs: Any):
        if inputs.transform is None:
            raise ValueError("this model's image tower takes precomputed features (img.npy), not images")
        self._inputs = inputs
        data = inputs.cfg.image.preprocess
        self.mean, self.std = tuple(inputs.mean), tuple(inputs.std)
        self.size = tuple(data.get("input_size", ()))[1:]
        self.interpolation, self.crop_pct, self.crop_mode = (
            data.get("interpolation"),
            data.get("crop_pct"),
            data.get("crop_mode"),
        )

    def __call__(self, image: ImageLike) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, (str, os.PathLike, bytes)):
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
                return self(im.convert("RGB"))
        pixels = self._inputs.transform(image if image.mode == "RGB" else image.convert("RGB"))
        return self._inputs.normalize(pixels)

    def __repr__(self) -> str:
        return (
            f"Preprocess(size={self.size}, interpolation={self.interpolation!r}, crop_pct={self.crop_pct}, "
            f"crop_mode={self.crop_mode!r}, mean={self.mean}, std={self.std})"
        )


class Model:
    """An exported two-tower model, ready to embed images and texts (see the module docstring)."""

    def __init__(self, export_dir: str | Path, device: str | torch.device | None = None):
        from fgcmr.model.export import load_export

        self.export_dir = Path(export_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net, self.config, self._inputs = load_export(self.export_dir, device=self.device)
        self.info: dict = read_export_config(self.export_dir).get(INFO) or {}  # version, provenance, …
        self.preprocess = Preprocess(self._inputs) if self._inputs.transform is not None else None

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def tokenizer(self):
        return self._inputs.tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids + attention mask, padded to the longest text, truncated to the model's max length."""
        if self._inputs.tokenizer is None:
            raise ValueError("this model's text tower takes precomputed features (txt.npy), not strings")
        ids = [torch.tensor(self._inputs._encoder.encode(t).ids, dtype=torch.long) for t in texts]
        return self._inputs.collate_texts(ids)

    @torch.inference_mode()
    def encode_image(self, images: Iterable[ImageLike] | torch.Tensor, batch_size: int = 64, as_tensor: bool = False):
        """Unit vectors ``[n, d]`` of PIL images, image paths or encoded bytes (or one preprocessed batch tensor)."""
        if isinstance(images, torch.Tensor):
            return self._out(self.net.encode_image(self._inputs.normalize(images.to(self.device))).float(), as_tensor)
        if self.preprocess is None:
            raise ValueError("this model's image tower takes precomputed features: pass them as one tensor")
        images, out = list(images), []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]]).to(self.device)
            out.append(self.net.encode_image(batch).float())
        return self._out(self._cat(out), as_tensor)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str] | str, batch_size: int = 256, as_tensor: bool = False):
        """Unit vectors ``[n, d]`` of strings (a single string gives ``[1, d]``)."""
        texts, out = [texts] if isinstance(texts, str) else list(texts), []
        for i in range(0, len(texts), batch_size):
            batch = {k: v.to(self.device) for k, v in self.tokenize(texts[i : i + batch_size]).items()}
            out.append(self.net.encode_text(batch).float())
        return self._out(self._cat(out), as_tensor)

    @staticmethod
    def similarity(a, b):
        """Cosine similarities ``[len(a), len(b)]`` of two embedding batches (numpy or torch, as given)."""
        return a @ b.T

    def _cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros((0, self.embed_dim), device=self.device)

    @staticmethod
    def _out(x: torch.Tensor, as_tensor: bool):
        return x if as_tensor else x.cpu().numpy()

    def __repr__(self) -> str:
        return f"fgcmr.Model({str(self.export_dir)!r}, embed_dim={self.embed_dim}, device={self.device})"


def load(export_dir: str | Path, device: str | torch.device | None = None) -> Model:
    """The model of an export dir (``fgcmr export`` / ``save_pretrained``) on ``device`` (default: cuda if any)."""
    return Model(export_dir, device=device)
