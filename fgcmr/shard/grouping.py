"""Group caption rows into one item per image across a whole corpus, in bounded memory.

Row corpora (img2dataset output, WebDataset, CSV/JSONL/parquet caption lists) hold one *row* per
(image, caption): the captions of one image may sit anywhere. Their readers stream rows into a
``GroupSpill``: each row is appended to the partition file named by the first hex digits of
``sha256(item key)``. Partitions are then read one at a time (one over ``MAX_PARTITION_BYTES`` is first
re-split on the next digit), so memory is bounded by a partition, never by the corpus. Within a
partition rows are sorted by (hash, group, caption, row id), so the output order (items by the hash
of their key) does not depend on the input row order or on how many partitions there were: shuffled
input gives byte-identical shards.

Per group: rows that already failed (a download error) stay row skips; empty captions are
``empty_text`` skips and exact repeats ``duplicate_caption`` skips; the rest form one item whose image
comes from its first row. Two groups that would get the same sample key are adjacent (same hash), so
the second one's rows become ``duplicate_id`` skips without a corpus-wide set of keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from fgcmr.shard.records import Ref, make_key

MAX_PARTITION_BYTES = 8 << 20  # spilled JSON per partition read into memory at once
_FIRST_DIGITS = 2  # 256 partitions on the first pass; each re-split adds one hex digit (16 children)
_HASH_DIGITS = 16


@dataclasses.dataclass
class Row:
    """One input row as a reader sees it; ``skip`` is set when the row already failed (e.g. a download)."""

    group: str  # what makes rows one image: url, sha256 or path (or the row's own id for group_by=none)
    item_id: str  # the id of the item the group becomes
    text: str
    image: Any  # reader-specific, JSON-serialisable location of the image bytes (None for a failed row)
    source: str  # url or path, recorded in the sample's json
    row_id: str  # the row's own id, named in skip records
    split: str | None = None
    category: str | None = None
    skip: tuple[str, str] | None = None

    @classmethod
    def failed(cls, row_id: str, reason: str, detail: str, split: str | None = None) -> Row:
        """A row that failed before it could join a group (unreadable record, no image or text): a skip
        under its own id."""
        return cls("", row_id, "", None, row_id, row_id, split, skip=(reason, detail))


def item_hash(item_id: str) -> str:
    return hashlib.sha256(make_key(item_id).encode()).hexdigest()[:_HASH_DIGITS]


class GroupSpill:
    """Hash-partitioned spill files of rows under ``directory`` (private to one task, removed when read)."""

    def __init__(self, directory: Path):
        shutil.rmtree(directory, ignore_errors=True)  # left by a killed listing pass
        directory.mkdir(parents=True)
        self.directory = directory
        self._files: dict[str, Any] = {}
        self.categories: set[str] = set()
        self.rows = 0

    def add(self, row: Row) -> None:
        h = item_hash(row.item_id)
        prefix = h[:_FIRST_DIGITS]
        f = self._files.get(prefix)
        if f is None:
            f = self._files[prefix] = open(self.directory / f"{prefix}.jsonl", "w", encoding="utf-8")
        skip = list(row.skip) if row.skip else None
        f.write(
            json.dumps(
                [h, row.group, row.text, row.row_id, row.item_id, row.image, row.source, row.split, row.category, skip],
                ensure_ascii=False,
            )
            + "\n"
        )
        if row.category is not None and row.skip is None:
            self.categories.add(row.category)
        self.rows += 1

    def groups(self) -> Iterator[list[list]]:
        """Every group's spilled rows, groups in (hash, group) order, rows sorted within a group."""
        for f in self._files.values():
            f.close()
        self._files = {}
        try:
            for path in sorted(self.directory.glob("*.jsonl")):
                yield from _partition_groups(path)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _partition_groups(path: Path) -> Iterator[list[list]]:
    prefix = path.stem
    if path.stat().st_size > MAX_PARTITION_BYTES and len(prefix) < _HASH_DIGITS:
        children: dict[str, Any] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                digit = line[2 + len(prefix)]  # the line starts with ["<hash>
                out = children.get(digit)
                if out is None:
                    out = children[digit] = open(path.with_name(f"{prefix}{digit}.jsonl"), "w", encoding="utf-8")
                out.write(line)
        for out in children.values():
            out.close()
        path.unlink()
        for digit in sorted(children):
            yield from _partition_groups(path.with_name(f"{prefix}{digit}.jsonl"))
        return
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    path.unlink()
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][:2] != rows[start][:2]:
            yield rows[start:i]
            start = i


def grouped_refs(spill: GroupSpill, default_split: str, categories: list[str]) -> Iterator[Ref]:
    """Items (one per group, ``rows`` = captions kept) and row skips, in the spill's canonical order."""
    cat_ids = {name: i for i, name in enumerate(categories)}
    previous: tuple[str, str] | None = None
    for rows in spill.groups():
        h, group = rows[0][0], rows[0][1]
        key = make_key(rows[0][4])
        clash = previous is not None and previous[0] == h and previous[1] == key
        previous = (h, key)
        texts: list[str] = []
        first = None
        for _, _, text, row_id, item_id, image, source, split, category, skip in rows:
            split = split or default_split
            if clash:
                skip = ("duplicate_id", f"{group!r} gets the key {key!r} of an earlier image")
            elif skip is None and not text.strip():
                skip = ("empty_text", f"{source}: empty caption")
            elif skip is None and text.strip() in texts:
                skip = ("duplicate_caption", f"{source}: {text.strip()[:80]!r} repeated")
            if skip is not None:
                yield Ref(id=row_id, split=split, skip=tuple(skip))
                continue
            texts.append(text.strip())
            if first is None:
                first = (item_id, image, source, split, category)
        if first is not None:
            item_id, image, source, split, category = first
            yield Ref(
                id=item_id,
                split=split,
                category=None if category is None else cat_ids[category],
                data=(image, tuple(texts), source),
                rows=len(texts),
            )
