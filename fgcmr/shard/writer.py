"""Write one chunk of items as deterministic tar parts plus a completion record, resumably.

A chunk is a fixed run of input items of one split (``max_items_per_shard`` list positions), so which
shard an item lands in never depends on how many workers or tasks ran, or in which order. The byte
limit may cut a chunk into several parts. Parts and the record are written under temporary names
and renamed; the record is written last, so a chunk is complete exactly when its record exists and
its parts match the recorded sha256.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tarfile
from pathlib import Path
from typing import Callable

from fgcmr.io import atomic_open, atomic_write_json, read_json, sha256_file
from fgcmr.shard.records import Item, Ref, Skip

TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # end-of-archive marker; tarfile then pads to a multiple of tarfile.RECORDSIZE


@dataclasses.dataclass
class Chunk:
    split: str
    index: int
    refs: list[Ref]
    categories: list[str] | None

    @property
    def stem(self) -> str:
        return chunk_stem(self.split, self.index)


def chunk_stem(split: str, index: int) -> str:
    return f"{split}-c{index:06d}"


def member_bytes(size: int) -> int:
    """Bytes a member takes in a tar: one header block plus data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class PartWriter:
    """Tar parts ``<stem>-pNNN.tar`` with fixed member metadata (mtime 0, uid/gid 0, no owner names)."""

    def __init__(self, work: Path, stem: str, max_bytes: int):
        self.work, self.stem, self.max_bytes = work, stem, max_bytes
        self.parts: list[dict] = []
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None
        self._items = self._bytes = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        size = sum(member_bytes(len(data)) for _, data in members)
        if self._tar is not None and self._bytes + size + TAR_END > self.max_bytes:
            self._close_part()
        if self._tar is None:
            self._open_part()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._items += 1
        self._bytes += size

    def _open_part(self) -> None:
        self._path = self.work / f"{self.stem}-p{len(self.parts):03d}.tar"
        self._stack = contextlib.ExitStack()
        f = self._stack.enter_context(atomic_open(self._path, "wb"))
        self._tar = tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT)
        self._items = self._bytes = 0

    def _close_part(self) -> None:
        self._tar.close()
        self._stack.close()
        self._tar = self._stack = None
        path = self._path
        self.parts.append(
            {"file": path.name, "items": self._items, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_part()
        return self.parts

    def abort(self) -> None:
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._tar = self._stack = None


def write_chunk(
    chunk: Chunk,
    work: Path,
    load: Callable[[Ref], Item],
    encode: Callable[[Item, list[str] | None], list],
    max_bytes: int,
) -> dict:
    """Load, check and encode every item of ``chunk``; write its parts and record; return the record."""
    writer = PartWriter(work, chunk.stem, max_bytes)
    skipped: list[dict] = []
    counts: dict[int, int] = {}
    rows_written = 0
    try:
        for ref in chunk.refs:
            try:
                if ref.skip is not None:
                    raise Skip(*ref.skip)
                item = load(ref)
                writer.add(encode(item, chunk.categories))
            except Skip as s:
                skipped.append(
                    {"id": ref.id, "split": ref.split, "reason": s.reason, "detail": s.detail, "rows": ref.rows}
                )
                continue
            rows_written += ref.rows
            if item.category is not None:
                counts[item.category] = counts.get(item.category, 0) + 1
        parts = writer.close()
    except BaseException:
        writer.abort()
        raise
    record = {
        "split": chunk.split,
        "chunk": chunk.index,
        "items_in": len(chunk.refs),
        "items_written": sum(p["items"] for p in parts),
        "rows_in": sum(ref.rows for ref in chunk.refs),
        "rows_written": rows_written,
        "parts": parts,
        "skipped": skipped,
        "category_counts": {str(k): counts[k] for k in sorted(counts)},
    }
    atomic_write_json(work / f"{chunk.stem}.json", record)
    return record


def verified_record(work: Path, stem: str, check_hash: bool = True) -> dict | None:
    """The chunk's record when the chunk is complete and its parts are intact, else None."""
    path = work / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except ValueError:
        return None
    for part in record["parts"]:
        file = work / part["file"]
        if not file.is_file() or file.stat().st_size != part["bytes"]:
            return None
        if check_hash and sha256_file(file) != part["sha256"]:
            return None
    return record
