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
exactly once and in order (label inference, evaluation, verification), and for the training loader.

Every read is checked against the manifest as it streams (``iter_records``): the file's size before
reading, every sample's ``.json``, and the item count at the end. Python's ``tarfile`` takes a corrupt
header in the middle of an archive for its end, so without the count a damaged shard would silently
lose its tail. A mismatch raises ``ShardError`` naming the shard, or with ``on_corrupt="skip"`` is
logged and counted (the rest of that shard is skipped).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Collection, Iterator, Literal

import numpy as np

from fgcmr.io import CorruptFileError, read_json

log = logging.getLogger("fgcmr.dataset")
OnCorrupt = Literal["error", "skip"]

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

    @property
    def category_id(self) -> int:
        """The category as metrics and losses compare it: its id, or -1 for none (``labels.relevance``)."""
        category = self.meta.get("category")
        return -1 if category is None else int(category)


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


class ShardError(CorruptFileError):
    """A data shard differs from its manifest entry (size, items) or cannot be read."""


def open_dataset(root: str | Path) -> DatasetInfo:
    """Load a sharded dataset's manifest, with a clear error when it is not one or is damaged."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a sharded dataset (no manifest.json); run `fgcmr shard` first")
    try:
        manifest = read_json(path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
            raise CorruptFileError(f"{path} has no 'splits' table")
    except CorruptFileError as e:
        raise CorruptFileError(
            f"dataset manifest damaged: {e}; rerun `fgcmr shard` with the same --out "
            "(completed chunks are kept, so it only rewrites the manifest)"
        ) from None
    return DatasetInfo(root=root, manifest=manifest)


_MANIFESTS: dict[Path, tuple[tuple[int, int], dict[str, ShardInfo]]] = {}


def shard_record(shard: str | Path) -> ShardInfo | None:
    """The manifest's entry for a shard file (from ``manifest.json`` beside it), or None outside a dataset."""
    shard = Path(shard)
    path = shard.parent / "manifest.json"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _MANIFESTS.get(path)
    if cached is None or cached[0] != stamp:
        ds = open_dataset(shard.parent)
        cached = _MANIFESTS[path] = (stamp, {s.file: s for split in ds.split_names for s in ds.shard_infos(split)})
    return cached[1].get(shard.name)


def _shard_problem(shard: Path, what: str) -> str:
    return (
        f"data shard {shard} {what}: it is damaged or was changed after `fgcmr shard`; "
        f"check with `fgcmr verify {shard.parent}` and rerun `fgcmr shard` with the same --out to rewrite it "
        "(or train with --data.on_corrupt=skip)"
    )


def iter_records(
    shard: str | Path, fields: Collection[str] | None = None, on_corrupt: OnCorrupt = "error", checked: bool = True
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of one tar shard in stored order, checked against its manifest entry as it streams.

    Only ``fields`` (e.g. ``{"json"}``) are read if given. A shard not listed in a manifest (or with
    ``checked=False``, to count what a damaged one still holds) is read unchecked.
    """
    shard = Path(shard)
    expect = shard_record(shard) if checked else None

    def fail(what: str) -> None:
        message = _shard_problem(shard, what)
        if on_corrupt != "skip":
            raise ShardError(message)
        log.warning("skipped the rest of %s", message)

    if expect is not None and shard.stat().st_size != expect.bytes:
        fail(f"is {shard.stat().st_size} bytes, the manifest says {expect.bytes}")
        return
    want_json = expect is not None and (fields is None or "json" in fields)
    key, record, count = None, {}, 0
    try:
        with tarfile.open(shard, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name, _, field = Path(member.name).name.partition(".")
                if name != key and key is not None:
                    if want_json and "json" not in record:
                        return fail(f"has a sample without metadata ({key}.json missing)")
                    count += 1
                    yield key, record
                if name != key:
                    key, record = name, {}
                if fields is None or field in fields:
                    record[field] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        return fail(f"cannot be read after {count} samples ({type(e).__name__}: {e})")
    if key is not None:
        if want_json and "json" not in record:
            return fail(f"has a sample without metadata ({key}.json missing)")
        count += 1
        yield key, record
    if expect is not None and count != expect.items:
        fail(f"holds {count} samples, the manifest says {expect.items}")


def iter_samples(
    shard: str | Path, fields: Collection[str] | None = None, on_corrupt: OnCorrupt = "error"
) -> Iterator[Sample]:
    """Samples of one tar shard, in stored order, grouped by key and checked (``iter_records``)."""
    for key, record in iter_records(shard, fields, on_corrupt):
        try:
            sample = sample_from_fields(key, record)
        except ValueError as e:  # a damaged .json or .npy member
            raise ShardError(_shard_problem(Path(shard), f"has an unreadable sample {key} ({e})")) from None
        yield sample


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
