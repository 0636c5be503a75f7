"""Shards → tokenised, length-sorted text batches, prepared on a helper thread ahead of the encoder.

Reading a shard and tokenising its texts used to finish before the encoder could start on it, so a
job of one shard never overlapped the two. Here texts are sorted by token length within *windows* of
a shard and handed over batch by batch through a bounded queue: the encoder starts once the first
batch is ready while the helper thread reads and tokenises the rest (and the next shards). Windows
grow 1, 2, 4, … batches up to ``window_batches``: a quick start, then almost the padding of a
whole-shard sort. Batching depends only on the shard and the batch size, so 1 rank and N ranks embed
the same batches.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from transformers import PreTrainedTokenizerBase

from fgcmr.dataset import iter_samples
from fgcmr.label.encode import Batch, length_batches

T = TypeVar("T")
TEXT_FIELDS = frozenset({"json"})  # texts and category; image bytes are not read


@dataclasses.dataclass
class ShardTexts:
    keys: list[str]
    texts: list[list[str]]
    categories: list[int]  # −1 = none

    def add(self, key: str, texts: list[str], category: int) -> None:
        self.keys.append(key)
        self.texts.append(list(texts))
        self.categories.append(category)

    def records(self) -> Iterator[tuple[str, list[str], int]]:
        return zip(self.keys, self.texts, self.categories)

    @classmethod
    def read(cls, shard: Path) -> "ShardTexts":
        out = cls([], [], [])
        for s in iter_samples(shard, TEXT_FIELDS):
            out.add(s.key, s.texts, s.category_id)
        return out


@dataclasses.dataclass
class TextBatch:
    """One padded batch of a shard; its rows are positions in the shard's flat list of texts."""

    batch: Batch


@dataclasses.dataclass
class ShardEnd:
    """Follows the last batch of a shard; a ``kept`` shard (its sidecar already valid) has no batches."""

    shard: Path
    data: ShardTexts
    kept: bool


def window_texts(batch_size: int, window_batches: int) -> Iterator[int]:
    """Texts per window: 1, 2, 4, … batches, then ``window_batches`` batches from there on."""
    n = 1
    while True:
        yield batch_size * n
        n = min(2 * n, max(1, window_batches))


def shard_items(
    shard: Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    batch_size: int,
    window_batches: int,
    kept: Callable[[ShardTexts], bool] | None = None,
) -> Iterator[TextBatch | ShardEnd]:
    """A shard's text batches, window by window as it is read, then its ``ShardEnd``.

    With ``kept`` the shard is read whole first and ``kept(data)`` decides whether its existing
    sidecar stands (then only the ``ShardEnd`` follows); otherwise the shard is streamed.
    """
    data = ShardTexts([], [], [])
    if kept is None:
        records = ((s.key, s.texts, s.category_id) for s in iter_samples(shard, TEXT_FIELDS))
    else:
        whole = ShardTexts.read(shard)
        if kept(whole):
            yield ShardEnd(shard, whole, kept=True)
            return
        records = whole.records()
    sizes = window_texts(batch_size, window_batches)
    size, done, pending = next(sizes), 0, []
    for key, texts, category in records:
        data.add(key, texts, category)
        pending += texts
        if len(pending) >= size:
            yield from (TextBatch(b) for b in length_batches(tokenizer, pending, max_length, batch_size, first=done))
            size, done, pending = next(sizes), done + len(pending), []
    if pending:
        yield from (TextBatch(b) for b in length_batches(tokenizer, pending, max_length, batch_size, first=done))
    yield ShardEnd(shard, data, kept=False)


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` produced on a helper thread, at most ``depth`` ahead; its errors are raised here.

    Closing the generator (``contextlib.closing``) stops and joins the thread.
    """
    q: queue.Queue = queue.Queue(max(1, depth))
    stop = threading.Event()

    def put(tag: str, value) -> bool:
        while not stop.is_set():
            try:
                q.put((tag, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put("item", x):
                    return
            put("end", None)
        except BaseException as e:  # re-raised in the consumer
            put("error", e)

    thread = threading.Thread(target=produce, name="fgcmr-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            tag, value = q.get()
            if tag == "end":
                return
            if tag == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
