"""What flows through the sharder: references from a reader's listing pass, loaded items, and skips."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(item_id: str) -> str:
    """A tar-safe sample key: WebDataset splits member names at the first dot, so no dots or slashes."""
    return _KEY_UNSAFE.sub("_", item_id).strip("_") or "_"


@dataclasses.dataclass(frozen=True)
class Ref:
    """One input item as the cheap listing pass sees it; ``skip`` is set when the listing already fails it.

    ``data`` is reader-specific (paths, row numbers, captions) and must be small and picklable: refs
    travel to worker processes in chunks. ``rows`` is how many input rows (caption records) the ref
    stands for, so the manifest can account for every row of a row corpus.
    """

    id: str
    split: str
    category: int | None = None
    data: Any = None
    skip: tuple[str, str] | None = None
    rows: int = 1

    @property
    def key(self) -> str:
        return make_key(self.id)


@dataclasses.dataclass
class Item:
    """A loaded item: everything one sample needs, before image checks and encoding."""

    id: str
    split: str
    category: int | None
    texts: list[str]
    source: str
    image: bytes | None = None
    image_feature: np.ndarray | None = None
    text_feature: np.ndarray | None = None


@dataclasses.dataclass
class Skip(Exception):
    """An input that cannot become a sample; ``reason`` is a stable snake_case name counted in the manifest."""

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
