"""Existing WebDataset tars as input: img2dataset output, or any WebDataset of images and captions.

- ``img2dataset``: ``<root>/NNNNN.tar`` + ``NNNNN.parquet`` (+ ``NNNNN_stats.json``), one sample per
  (url, caption) row. The parquet lists every row of the URL list, including failed ones, so it
  drives the listing: a ``success`` row takes its image from the tar (found by key), any other status
  is a row skip (``download_failed`` / ``decode_failed``, detail = img2dataset's ``error_message``).
- ``webdataset``: every ``*.tar`` under ``root``; a sample's image is its first member with an
  extension in ``image_exts`` (``jpg;png;webp``), its text the ``txt`` member or, with
  ``text_field=json.<field>``, a field of its ``json`` member, which also supplies ``url``, ``sha256``,
  the split column and the category column when present.

Rows are grouped into one item per image (``group_by``: ``url``, ``sha256`` or ``none``) by
``fgcmr.shard.grouping``. An item's id is a hash of its group (``u…`` for a url, the first 20 digits
of the sha256), so ids do not depend on where in the corpus its rows were. Images are read back by
(tar, offset, size), so loading needs no tar iteration.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Iterator

from fgcmr.config import ConfigError
from fgcmr.shard.grouping import GroupSpill, Row, grouped_refs
from fgcmr.shard.records import Item, Ref, Skip
from fgcmr.shard.readers import Reader

I2D_REASONS = {"failed_to_download": "download_failed", "failed_to_resize": "decode_failed"}


def member_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: key = path up to the first dot of the base name, ext = the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def tar_members(path: Path) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in a tar, reading only the 512-byte headers.

    Plain ustar headers (what img2dataset and most WebDataset writers produce) are parsed directly, a
    few times faster than ``tarfile``; an archive using GNU long names or pax headers goes through
    ``tarfile``. A corrupt header is an error, not the end of the archive (``tarfile``'s reading)."""
    size_total = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while offset + 512 <= size_total:
            f.seek(offset)
            header = f.read(512)
            if header == _ZERO_BLOCK:
                return
            kind = header[156:157]
            if kind in (b"L", b"K", b"x", b"g") or header[257:262] != b"ustar":
                yield from _tarfile_members(path)
                return
            try:
                size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                raise ConfigError(f"{path}: corrupt tar header at byte {offset}") from None
            if sum(header[:148]) + 256 + sum(header[156:]) != int(header[148:156].rstrip(b"\0 ") or b"0", 8):
                raise ConfigError(f"{path}: corrupt tar header at byte {offset} (checksum)")
            if kind in (b"0", b"\0", b"7"):
                name = header[:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0]
                full = (prefix + b"/" + name) if prefix else name
                yield full.decode("utf-8", errors="replace"), offset + 512, size
            offset += 512 + -(-size // 512) * 512  # a member cut short by the file's end: ``load`` skips it


_ZERO_BLOCK = bytes(512)


def _tarfile_members(path: Path) -> Iterator[tuple[str, int, int]]:
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, member.offset_data, member.size
                tar.members = []  # keep memory per tar flat
    except tarfile.TarError as e:
        raise ConfigError(f"{path}: not a readable tar file ({e})") from None


def tar_samples(path: Path, read: set[str]) -> Iterator[tuple[str, dict]]:
    """``(key, {ext: (offset, size) or bytes})`` per sample, members of one key being adjacent; the
    members whose extension is in ``read`` come as bytes, the others as a location."""
    with open(path, "rb") as f:
        key, fields = None, {}
        for name, offset, size in tar_members(path):
            k, ext = member_key(name)
            if k != key:
                if key is not None:
                    yield key, fields
                key, fields = k, {}
            ext = ext.lower()
            if ext in read:
                f.seek(offset)
                fields[ext] = f.read(size)
            else:
                fields[ext] = (offset, size)
        if key is not None:
            yield key, fields


def _exts(spec: str) -> list[str]:
    return [e.strip().lower().lstrip(".") for e in spec.split(";") if e.strip()]


def group_of(group_by: str, url: str | None, sha256: str | None, key: str, where: str) -> tuple[str, str]:
    """``(group, item id)`` of a row: url, sha256, or the row's own key."""
    if group_by == "url":
        if not url:
            raise ConfigError(f"{where}: group_by=url needs a 'url' for every sample; use --group_by=sha256 or none")
        return url, "u" + hashlib.sha256(url.encode()).hexdigest()[:20]
    if group_by == "sha256":
        if not sha256:
            raise ConfigError(f"{where}: group_by=sha256 needs a 'sha256' for every sample; use --group_by=url or none")
        return sha256, sha256[:20]
    return key, key


class _TarReader(Reader):
    unique_ids = True

    def __init__(self, root: Path, cfg, spill_dir: Path):
        self.root, self.cfg, self.spill_dir = root, cfg, spill_dir
        self.image_exts = _exts(cfg.image_exts)
        self.categories: list[str] | None = None

    def refs(self) -> Iterator[Ref]:
        spill = GroupSpill(self.spill_dir)
        for row in self._rows():
            spill.add(row)
        self.categories = sorted(spill.categories) or None
        yield from grouped_refs(spill, self.cfg.default_split, self.categories or [])

    def load(self, ref: Ref) -> Item:
        (tar, offset, size), texts, source = ref.data
        with open(self.root / tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise Skip("missing_image", f"{tar} ends inside the image of {ref.id}")
        return Item(id=ref.id, split=ref.split, category=ref.category, texts=list(texts), source=source, image=data)

    def _image(self, fields: dict) -> tuple[str, tuple[int, int]] | None:
        return next(((ext, fields[ext]) for ext in self.image_exts if ext in fields), None)


class WebDatasetReader(_TarReader):
    def __init__(self, root: Path, cfg, spill_dir: Path):
        super().__init__(root if root.is_dir() else root.parent, cfg, spill_dir)
        self.tars = sorted(root.rglob("*.tar")) if root.is_dir() else [root]
        if not self.tars:
            raise ConfigError(f"--root {root}: no .tar files for source='webdataset'")
        field = cfg.text_field
        self.text_json = field.split(".", 1)[1] if field.startswith("json.") else None
        self.text_ext = None if self.text_json else field

    def _rows(self) -> Iterator[Row]:
        c = self.cfg
        for path in self.tars:
            tar = str(path.relative_to(self.root))
            read = {"json", self.text_ext or "json"} | ({"sha256"} if c.group_by == "sha256" else set())
            for key, fields in tar_samples(path, read):
                row_id = f"{tar}:{key}"
                try:
                    meta = json.loads(fields["json"]) if "json" in fields else {}
                except ValueError:
                    meta = None
                if not isinstance(meta, dict):
                    yield Row.failed(row_id, "bad_record", f"{row_id}: its json is not an object")
                    continue
                text = meta.get(self.text_json) if self.text_json else fields.get(self.text_ext)
                text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
                split, category = _str(meta.get(c.split_col)), _str(meta.get(c.category_col))
                image = self._image(fields)
                skip = None
                if image is None:
                    skip = ("missing_image", f"{row_id}: no member with extension {'/'.join(self.image_exts)}")
                elif text is None:
                    skip = ("missing_text", f"{row_id}: no {c.text_field}")
                elif "\ufffd" in text:
                    skip = ("text_not_utf8", f"{row_id}: the caption is not valid UTF-8")
                if skip:
                    yield Row.failed(row_id, *skip, split)
                    continue
                sha = _str(meta.get("sha256")) if c.group_by == "sha256" else None
                if c.group_by == "sha256" and not sha:
                    with open(path, "rb") as f:
                        f.seek(image[1][0])
                        sha = hashlib.sha256(f.read(image[1][1])).hexdigest()
                group, item_id = group_of(c.group_by, _str(meta.get("url")), sha, key, row_id)
                yield Row(
                    group,
                    item_id,
                    str(text),
                    [tar, *image[1]],
                    _str(meta.get("url")) or row_id,
                    row_id,
                    split,
                    category,
                )


class Img2DatasetReader(_TarReader):
    def __init__(self, root: Path, cfg, spill_dir: Path):
        if not root.is_dir():
            raise ConfigError(f"--root {root} must be an img2dataset output folder for source='img2dataset'")
        super().__init__(root, cfg, spill_dir)
        self.parquets = sorted(root.glob("*.parquet"))
        if not self.parquets:
            raise ConfigError(
                f"--root {root}: no NNNNN.parquet files; is this img2dataset output (--output_format=webdataset)?"
            )
        import pyarrow.parquet as pq

        need = {"key", "status", "url", cfg.caption_col} | ({"sha256"} if cfg.group_by == "sha256" else set())
        for path in self.parquets:
            try:
                names = set(pq.ParquetFile(path).schema_arrow.names)
            except Exception as e:
                raise ConfigError(f"{path}: not a parquet file ({type(e).__name__}: {e})") from None
            if not need <= names:
                raise ConfigError(
                    f"{path}: img2dataset parquet lacks columns {sorted(need - names)} (has {sorted(names)})"
                )
            if not path.with_suffix(".tar").is_file() and pq.ParquetFile(path).metadata.num_rows:
                raise ConfigError(
                    f"{path}: no {path.with_suffix('.tar').name} beside it; "
                    "run img2dataset with --output_format=webdataset"
                )

    def _rows(self) -> Iterator[Row]:
        import pyarrow.parquet as pq

        c = self.cfg
        for path in self.parquets:
            tar = path.with_suffix(".tar")
            images = {}
            if tar.is_file():
                for key, fields in tar_samples(tar, set()):
                    image = self._image(fields)
                    if image is not None:
                        images[key] = image[1]
            f = pq.ParquetFile(path)
            names = f.schema_arrow.names
            columns = [
                n
                for n in ("key", "url", c.caption_col, "status", "error_message", "sha256", c.split_col, c.category_col)
                if n in names
            ]
            for batch in f.iter_batches(columns=list(dict.fromkeys(columns))):
                for r in batch.to_pylist():
                    yield self._row(r, images, tar.name)

    def _row(self, r: dict, images: dict, tar: str) -> Row:
        c = self.cfg
        key, url, text = str(r["key"]), _str(r.get("url")) or "", r.get(c.caption_col)
        split, category = _str(r.get(c.split_col)), _str(r.get(c.category_col))
        skip = None
        if r["status"] != "success":
            skip = (I2D_REASONS.get(r["status"], str(r["status"])), f"{url}: {r.get('error_message')}")
        elif key not in images:
            skip = ("missing_image", f"{tar} has no image for key {key}")
        elif text is None:
            skip = ("missing_text", f"{url}: no caption")
        if skip is not None:  # kept beside its url's other rows where it has one
            group, item_id = group_of("url", url, None, key, tar) if url and c.group_by == "url" else ("", key)
            return Row(group, item_id, "", None, url, key, split, skip=skip)
        group, item_id = group_of(c.group_by, url, _str(r.get("sha256")), key, tar)
        return Row(group, item_id, str(text), [tar, *images[key]], url, key, split, category)


def _str(v) -> str | None:
    return None if v is None or str(v).strip() == "" else str(v).strip()
