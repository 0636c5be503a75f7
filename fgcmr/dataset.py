"""The shard seam: what the ``shard`` stage writes and every later stage reads.

A dataset directory holds ``manifest.json``, ``sizes.json``, ``skipped.jsonl`` and WebDataset tars
``<split>-NNNNNN.tar``. Each sample is one image with all its texts:

- ``<key>.json``: ``id``, ``split``, ``category`` (int id or null), ``category_name``, ``texts``
  (every text of the image: its article section, or all its captions), ``source``, ``image_size``;
- the image as ``<key>.<ext>`` (original bytes; ext is the true format: jpg, png, webp, gif…)
  *or* an image feature ``<key>.img.npy``;
- ``<key>.txt``: the first text, and optionally a text feature ``<key>.txt.npy``.

Keys never contain a dot (WebDataset splits a member name at its first dot).
This module reads that layout in shard order without WebDataset, for jobs that need every sample
exactly once and in order (label inference, evaluation, verification).
"""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Collection, Iterator

import numpy as np

from fgcmr.io import read_json

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    file: str
    items: int
    bytes: int
    sha256: str


@dataclasses.dataclass
class Sample:
    key: str
    meta: dict
    image: bytes | None = None
    image_ext: str | None = None
    image_feature: np.ndarray | None = None
    text_feature: np.ndarray | None = None

    @property
    def texts(self) -> list[str]:
        return self.meta["texts"]

    @property
    def category(self) -> int | None:
        return self.meta.get("category")


@dataclasses.dataclass
class DatasetInfo:
    root: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.root.name

    @property
    def categories(self) -> list[str]:
        return list(self.manifest.get("categories") or [])

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def shard_infos(self, split: str) -> list[ShardInfo]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.root}: no split {split!r}; splits are {', '.join(self.split_names)}")
        return [ShardInfo(**s) for s in self.manifest["splits"][split]["shards"]]

    def shards(self, split: str) -> list[Path]:
        return [self.root / s.file for s in self.shard_infos(split)]

    def items(self, split: str) -> int:
        return int(self.manifest["splits"][split]["items"])


def open_dataset(root: str | Path) -> DatasetInfo:
    """Load a sharded dataset's manifest, with a clear error when it is not one."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a sharded dataset (no manifest.json); run `fgcmr shard` first")
    return DatasetInfo(root=root, manifest=read_json(path))


def iter_samples(shard: str | Path, fields: Collection[str] | None = None) -> Iterator[Sample]:
    """Samples of one tar shard, in stored order, grouped by key; only ``fields`` (e.g. ``{"json"}``) are read if given."""
    current: Sample | None = None
    with tarfile.open(shard, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, field = Path(member.name).name.partition(".")
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = Sample(key=key, meta={})
            if fields is None or field in fields:
                _set_field(current, field, tar.extractfile(member).read())
    if current is not None:
        yield current


def _set_field(sample: Sample, field: str, data: bytes) -> None:
    if field == "json":
        sample.meta = json.loads(data)
    elif field == "img.npy":
        sample.image_feature = np.load(io.BytesIO(data), allow_pickle=False)
    elif field == "txt.npy":
        sample.text_feature = np.load(io.BytesIO(data), allow_pickle=False)
    elif field in IMAGE_EXTS:
        sample.image, sample.image_ext = data, field


def sample_from_fields(key: str, fields: dict[str, bytes]) -> Sample:
    """A ``Sample`` from one WebDataset record's raw fields (``{"json": b"…", "jpg": b"…"}``)."""
    sample = Sample(key=key, meta={})
    for field, data in fields.items():
        _set_field(sample, field, data)
    return sample
