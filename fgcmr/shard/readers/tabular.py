"""Tabular caption lists: CSV, JSONL or parquet with one row per (image, caption), grouped across the file.

Columns are named by ``image_col`` (a path under ``images``), ``caption_col``, and optional
``split_col`` / ``category_col`` (defaults ``image``, ``caption``, ``split``, ``category``). Rows are
grouped by image wherever they sit (``group_by=url``: the image column's value; ``sha256``: the image
file's content; ``none``: every row its own item) through ``fgcmr.shard.grouping``, so memory stays
bounded. CSV/JSONL stream line by line (a line that is not valid UTF-8 is a ``text_not_utf8`` row skip),
parquet streams by row group with pyarrow. ``root`` may be one file or a directory of such files.

An item's split is its row's split column, else the one given for its image in ``splits_file`` (a CSV
``image,<split column>``, e.g. Flickr8k's ``splits.csv``; names are kept as given, so Flickr8k's
unassigned image lands in a split named ``none``), else ``default_split``. Category values are names,
numbered in sorted order.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator

from fgcmr.config import ConfigError
from fgcmr.shard.grouping import GroupSpill, Row, grouped_refs
from fgcmr.shard.records import Item, Ref, Skip
from fgcmr.shard.readers import Reader

SUFFIXES = {"csv": (".csv", ".txt", ".tsv"), "jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",)}
_MAGIC = {
    b"PAR1": "a parquet file (use --source=parquet)",
    b"\x1f\x8b": "gzip-compressed (decompress it first)",
    b"PK\x03\x04": "a zip archive",
    b"ustar": "a tar archive (use --source=webdataset)",
}


class TabularReader(Reader):
    unique_ids = True  # grouping turns key clashes into duplicate_id skips

    def __init__(self, root: Path, kind: str, cfg, spill_dir: Path):
        self.kind, self.cfg, self.spill_dir = kind, cfg, spill_dir
        self.files = sorted(p for p in root.iterdir() if p.suffix in SUFFIXES[kind]) if root.is_dir() else [root]
        if not self.files:
            raise ConfigError(f"--root {root}: no {'/'.join(SUFFIXES[kind])} files for source={kind!r}")
        base = self.files[0].parent
        self.images = Path(cfg.images) if cfg.images else (base / "images" if (base / "images").is_dir() else base)
        if not self.images.is_dir():
            raise FileNotFoundError(f"--images {self.images} does not exist")
        self.splits = read_splits(Path(cfg.splits_file)) if cfg.splits_file else {}
        self.categories: list[str] | None = None
        for path in self.files:
            self._check(path)

    def _check(self, path: Path) -> None:
        """A wrong file type, encoding or header is a config error naming the file, before any work."""
        need = {self.cfg.image_col, self.cfg.caption_col}
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                names = set(pq.ParquetFile(path).schema_arrow.names)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for anything that is not parquet
                raise ConfigError(f"{path}: not a parquet file ({type(e).__name__}: {e})") from None
        else:
            head = _head(path)
            for magic, what in _MAGIC.items():
                if head.startswith(magic) or (magic == b"ustar" and head[257:262] == magic):
                    raise ConfigError(f"{path}: is {what}, not a {self.kind.upper()} text file")
            text = head.decode("utf-8", errors="replace")
            if "\0" in text or text.count("\ufffd") > max(8, len(text) // 100):
                raise ConfigError(
                    f"{path}: not UTF-8 text; convert it to UTF-8 (e.g. `iconv -t UTF-8`) for source={self.kind!r}"
                )
            if self.kind == "jsonl":
                return
            names = set(next(csv.reader(text.lstrip("\ufeff").splitlines()[:1]), []))
        if not need <= names:
            raise ConfigError(f"{path}: needs columns {sorted(need)} (--image_col, --caption_col), has {sorted(names)}")

    def refs(self) -> Iterator[Ref]:
        spill = GroupSpill(self.spill_dir)
        for row in self._rows():
            spill.add(row)
        self.categories = sorted(spill.categories) or None
        yield from grouped_refs(spill, self.cfg.default_split, self.categories or [])

    def _rows(self) -> Iterator[Row]:
        c = self.cfg
        for path in self.files:
            for n, record in self._records(path):
                row_id = f"{path.name}:{n}"
                if not isinstance(record, dict):
                    yield Row.failed(row_id, "bad_record", f"{row_id}: not a JSON object")
                    continue
                image, caption = str(record.get(c.image_col) or "").strip(), record.get(c.caption_col)
                if not image or caption is None:
                    yield Row.failed(row_id, "bad_record", f"{row_id}: needs {c.image_col!r} and {c.caption_col!r}")
                    continue
                split = _value(record.get(c.split_col)) or self.splits.get(image)
                category = _value(record.get(c.category_col))
                yield self._row(image, str(caption), row_id, split, category)

    def _row(self, image: str, caption: str, row_id: str, split: str | None, category: str | None) -> Row:
        group, item_id = image, str(Path(image).with_suffix(""))
        if self.cfg.group_by == "none":
            group = item_id = f"{item_id}@{row_id}"
        elif self.cfg.group_by == "sha256":
            try:
                group = hashlib.sha256((self.images / image).read_bytes()).hexdigest()
            except OSError:
                return Row(
                    image,
                    item_id,
                    caption,
                    None,
                    image,
                    row_id,
                    split,
                    skip=("missing_image", str(self.images / image)),
                )
            item_id = group[:20]
        skip = ("text_not_utf8", f"{row_id}: the caption is not valid UTF-8") if "\ufffd" in caption else None
        return Row(group, item_id, caption, image, image, row_id, split, category, skip)

    def _records(self, path: Path) -> Iterator[tuple[int, object]]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            f = pq.ParquetFile(path)
            wanted = [
                c
                for c in (self.cfg.image_col, self.cfg.caption_col, self.cfg.split_col, self.cfg.category_col)
                if c in f.schema_arrow.names
            ]
            n = 0
            for batch in f.iter_batches(columns=wanted):
                for record in batch.to_pylist():
                    n += 1
                    yield n, record
            return
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            if self.kind == "csv":
                yield from enumerate(csv.DictReader(f), start=2)
            else:
                yield from ((n, _json_line(line)) for n, line in enumerate(f, start=1) if line.strip())

    def load(self, ref: Ref) -> Item:
        image, texts, source = ref.data
        path = self.images / image
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise Skip("missing_image", str(path)) from None
        return Item(id=ref.id, split=ref.split, category=ref.category, texts=list(texts), source=source, image=data)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 16)


def _value(v) -> str | None:
    return None if v is None or str(v).strip() == "" else str(v).strip()


def _json_line(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_splits(path: Path) -> dict[str, str]:
    """``image → split`` from a two-column CSV with a header (e.g. ``image,flickr8k_split``)."""
    if not path.is_file():
        raise FileNotFoundError(f"--splits_file {path} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        next(rows, None)
        return {row[0].strip(): row[1].strip() for row in rows if len(row) >= 2 and row[0].strip()}
