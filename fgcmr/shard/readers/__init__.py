"""Corpus readers: each one a ``Reader``. ``make_reader`` checks paths and layout, so a wrong input
fails before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

from fgcmr.shard.records import Item, Ref


class Reader(Protocol):
    """What the shard job asks of a corpus. Readers subclass it, inheriting the defaults."""

    categories: list[str] | None = None  # category names (``Ref.category`` indexes them); final once refs() ran
    total: int | None = None  # items, when known without listing (progress shows an ETA)
    unique_ids: bool = False  # ids never repeat, so the job needs no duplicate check

    def refs(self) -> Iterator[Ref]:
        """The cheap, ordered listing pass, run in the main process."""
        ...

    def load(self, ref: Ref) -> Item:
        """The expensive part, run in workers; raises ``Skip``."""
        ...


def make_reader(cfg) -> Reader:
    """The reader for ``cfg.source``; raises FileNotFoundError or ConfigError on a wrong path or layout."""
    from fgcmr.config import ConfigError

    if cfg.source == "synthetic":
        from fgcmr.shard.readers.synthetic import SyntheticReader

        try:
            return SyntheticReader(
                cfg.items, cfg.seed, cfg.image_size, cfg.captions, cfg.data.jpeg_quality, cfg.atypical, cfg.mislabel
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
    root = Path(cfg.root)
    if not root.exists():
        raise FileNotFoundError(f"--root {root} does not exist")
    if cfg.source == "wikipedia":
        from fgcmr.shard.readers.wikipedia import WikipediaReader

        return WikipediaReader(root, features=cfg.features)
    if cfg.source == "folder":
        from fgcmr.shard.readers.folder import FolderReader

        return FolderReader(root, default_split=cfg.default_split)
    from fgcmr.shard.manifest import WORK_DIR

    spill = Path(cfg.out) / WORK_DIR / f"spill-{cfg.task_index}"  # row corpora group through these files
    if cfg.source in ("csv", "jsonl", "parquet"):
        from fgcmr.shard.readers.tabular import TabularReader

        return TabularReader(root, cfg.source, cfg, spill)
    if cfg.source == "img2dataset":
        from fgcmr.shard.readers.tars import Img2DatasetReader

        return Img2DatasetReader(root, cfg, spill)
    if cfg.source == "webdataset":
        from fgcmr.shard.readers.tars import WebDatasetReader

        return WebDatasetReader(root, cfg, spill)
    from fgcmr.shard.readers.captions import CaptionReader

    return CaptionReader(
        root, cfg.source, images=cfg.images, splits_file=cfg.splits_file, default_split=cfg.default_split
    )
