"""Karpathy-style caption JSON (COCO, Flickr30k): ``images[]`` with ``filename``, optional ``filepath``,
``split`` and ``sentences[].raw``, one entry per image. Its ``restval`` split is merged into ``train``,
as is customary. The file is parsed whole (the JSON format cannot be streamed without extra packages).
Row-per-caption lists (CSV, JSONL, parquet) are ``fgcmr.shard.readers.tabular``.

An item's split is its entry's ``split``, else the one given for its image in ``splits_file``, else
``default_split``. Images are looked up under ``images`` (default: an ``images/`` folder beside the
JSON file, else its folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from fgcmr.config import ConfigError
from fgcmr.shard.readers.tabular import read_splits
from fgcmr.shard.records import Item, Ref, Skip
from fgcmr.shard.readers import Reader

KARPATHY_SPLITS = {"restval": "train"}


class CaptionReader(Reader):
    unique_ids = False

    def __init__(
        self,
        root: Path,
        kind: str,
        images: str | None = None,
        splits_file: str | None = None,
        default_split: str = "train",
    ):
        if not root.is_file():
            raise ConfigError(f"--root {root} must be the {kind} caption file for source={kind!r}")
        self.root, self.kind, self.default_split = root, kind, default_split
        self.images = (
            Path(images) if images else (root.parent / "images" if (root.parent / "images").is_dir() else root.parent)
        )
        if not self.images.is_dir():
            raise FileNotFoundError(f"--images {self.images} does not exist")
        self.splits = read_splits(Path(splits_file)) if splits_file else {}
        self.categories: list[str] | None = None
        self._category_ids: dict[str, int] = {}
        if kind == "karpathy":
            with open(root, encoding="utf-8", errors="replace") as f:
                head = f.read(1 << 16)
            if not head.lstrip().startswith("{") or '"images"' not in head:
                raise ConfigError(f"{root}: not a Karpathy JSON file (expected an object with an 'images' list)")

    def refs(self) -> Iterator[Ref]:
        yield from self._karpathy_refs()

    def _karpathy_refs(self) -> Iterator[Ref]:
        try:
            with open(self.root, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{self.root}: not a Karpathy JSON file: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ConfigError(f"{self.root}: not a Karpathy JSON file (no top-level 'images' list)")
        for n, entry in enumerate(data["images"]):
            if not isinstance(entry, dict) or not entry.get("filename"):
                yield Ref(
                    id=f"images{n}", split=self.default_split, skip=("bad_record", f"images[{n}] has no filename")
                )
                continue
            image = str(Path(entry.get("filepath") or "") / entry["filename"])
            split = str(entry.get("split") or self.splits.get(image) or self.default_split)
            texts = [s.get("raw", "") for s in entry.get("sentences") or [] if isinstance(s, dict)]
            yield self._ref(image, KARPATHY_SPLITS.get(split, split), texts, None)

    def _ref(self, image: str, split: str, texts: list[str], category: str | None) -> Ref:
        item_id = str(Path(image).with_suffix(""))
        cat_id = None
        if category is not None:
            if category not in self._category_ids:
                self._category_ids[category] = len(self._category_ids)
                self.categories = list(self._category_ids)
            cat_id = self._category_ids[category]
        return Ref(id=item_id, split=split, category=cat_id, data=(image, tuple(texts)))

    def load(self, ref: Ref) -> Item:
        image, texts = ref.data
        path = self.images / image
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise Skip("missing_image", str(path)) from None
        return Item(id=ref.id, split=ref.split, category=ref.category, texts=list(texts), source=image, image=data)
