"""Caption corpora: several captions per image, grouped into one item per image.

- ``karpathy``: Karpathy-style JSON (COCO, Flickr30k): ``images[]`` with ``filename``, optional
  ``filepath``, ``split`` and ``sentences[].raw``. Its ``restval`` split is merged into ``train``, as is
  customary. The file is parsed whole (the JSON format cannot be streamed without extra packages).
- ``jsonl`` / ``csv``: one record per caption with ``image``, ``caption``, optional ``category`` and
  ``split``. Consecutive records of one image form one item; an image that reappears later is a
  ``duplicate_id`` skip. Category values are names, numbered in order of first appearance.

An item's split is its record's ``split`` field, else the one given for its image in ``splits_file``
(a CSV ``image,<split column>``, e.g. Flickr8k's ``splits.csv``; split names are kept as given,
so Flickr8k's unassigned image lands in a split named ``none``), else ``default_split``. Images are
looked up under ``images`` (default: an ``images/`` folder beside the caption file, else its folder).
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Iterator

from fgcmr.config import ConfigError
from fgcmr.shard.records import Item, Ref, Skip

KARPATHY_SPLITS = {"restval": "train"}
_SKIP = "\0skip"  # marks an unreadable record; cannot collide with a field of a real record


class CaptionReader:
    unique_ids = False

    def __init__(self, root: Path, kind: str, images: str | None = None, splits_file: str | None = None, default_split: str = "train"):
        if not root.is_file():
            raise ConfigError(f"--root {root} must be the {kind} caption file for source={kind!r}")
        self.root, self.kind, self.default_split = root, kind, default_split
        self.images = Path(images) if images else (root.parent / "images" if (root.parent / "images").is_dir() else root.parent)
        if not self.images.is_dir():
            raise FileNotFoundError(f"--images {self.images} does not exist")
        self.splits = _read_splits(Path(splits_file)) if splits_file else {}
        self.categories: list[str] | None = None
        self._category_ids: dict[str, int] = {}
        if kind == "karpathy":
            with open(root, encoding="utf-8", errors="replace") as f:
                head = f.read(1 << 16)
            if not head.lstrip().startswith("{") or '"images"' not in head:
                raise ConfigError(f"{root}: not a Karpathy JSON file (expected an object with an 'images' list)")
        if kind == "csv":
            with open(root, encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f), [])
            if not {"image", "caption"} <= set(header):
                raise ConfigError(f"{root}: a CSV caption file needs a header with 'image' and 'caption' columns, got {header}")

    def refs(self) -> Iterator[Ref]:
        if self.kind == "karpathy":
            yield from self._karpathy_refs()
            return
        group: list[dict] = []
        for record in self._records():
            if _SKIP in record:
                yield from self._flush(group)
                group = []
                yield Ref(id=record["id"], split=self.default_split, skip=record[_SKIP])
            elif group and record["image"] != group[0]["image"]:
                yield from self._flush(group)
                group = [record]
            else:
                group.append(record)
        yield from self._flush(group)

    def _records(self) -> Iterator[dict]:
        """Caption records as dicts; an unreadable one is ``{"id": ..., _SKIP: (reason, detail)}``."""
        with open(self.root, encoding="utf-8-sig", errors="replace", newline="") as f:
            if self.kind == "csv":
                rows = enumerate(csv.DictReader(f), start=2)
            else:
                rows = ((n, _json_line(line)) for n, line in enumerate(f, start=1) if line.strip())
            for n, row in rows:
                where = f"{self.root.name}:{n}"
                if not isinstance(row, dict):
                    yield {"id": f"record{n}", _SKIP: ("bad_record", f"{where}: not a JSON object")}
                elif not str(row.get("image") or "").strip() or row.get("caption") is None:
                    yield {"id": f"record{n}", _SKIP: ("bad_record", f"{where}: needs 'image' and 'caption'")}
                else:
                    yield row

    def _flush(self, group: list[dict]) -> Iterator[Ref]:
        if not group:
            return
        first = group[0]
        image = str(first["image"]).strip()
        split = str(first.get("split") or self.splits.get(image) or self.default_split)
        category = first.get("category")
        ref = self._ref(image, split, [str(r["caption"]) for r in group], None if category in (None, "") else str(category))
        if any("\ufffd" in text for text in ref.data[1]):  # the file is read with errors="replace"
            ref = dataclasses.replace(ref, skip=("text_not_utf8", f"{image}: a caption is not valid UTF-8"))
        yield ref

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
                yield Ref(id=f"images{n}", split=self.default_split, skip=("bad_record", f"images[{n}] has no filename"))
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


def _json_line(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _read_splits(path: Path) -> dict[str, str]:
    """``image → split`` from a two-column CSV with a header (e.g. ``image,flickr8k_split``)."""
    if not path.is_file():
        raise FileNotFoundError(f"--splits_file {path} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        next(rows, None)
        return {row[0].strip(): row[1].strip() for row in rows if len(row) >= 2 and row[0].strip()}
