"""``fgcmr shard``: plan a corpus into fixed chunks, write them with N workers / T tasks, assemble.

The listing pass (cheap: list lines, CSV rows, synthetic indices) runs in full in every task and cuts
each split into chunks of ``max_items_per_shard`` input items; chunk ``g`` (in listing order) belongs
to task ``g % num_tasks``. Loading, checking and encoding items (the expensive part) happens per
chunk in worker processes. Completed chunks are kept across reruns, so a killed job resumes, and the
result never depends on the number of workers or tasks.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

from fgcmr.config import ConfigError, dump_yaml, to_dict
from fgcmr.io import atomic_write_json, clean_leftovers, read_json
from fgcmr.progress import Progress
from fgcmr.shard.config import EXECUTION_FIELDS, WORK_DIR, DataOptions, ShardConfig
from fgcmr.shard.manifest import finalize, plan_path
from fgcmr.shard.readers import Reader, make_reader
from fgcmr.shard.records import make_key
from fgcmr.shard.sample import encode_sample
from fgcmr.shard.writer import Chunk, verified_record, write_chunk

log = logging.getLogger("fgcmr.shard")

FAIL_AFTER_ENV = "FGCMR_SHARD_FAIL_AFTER"  # test hook: exit abruptly after this many chunks


def run(cfg: ShardConfig) -> dict:
    """Shard (this task's part of) the corpus; return the manifest, or this task's summary in an array."""
    out = Path(cfg.out)
    if cfg.merge or cfg.num_tasks == 1:
        clean_leftovers(out)  # temporary files of a killed finalize (tasks of an array write only under the work dir)
    if cfg.merge:
        return _report(finalize(out))
    reader = make_reader(cfg)  # a wrong path or layout fails here, before any work
    work = out / WORK_DIR
    dataset_config = _prepare(work, cfg)
    done = _write_chunks(cfg, reader, work)
    if not done["chunks"]:
        _discard(out, work)
        raise ConfigError(
            f"source={cfg.source!r} root={cfg.root}: no items found"
            + (f" in splits {cfg.splits}" if cfg.splits else "")
        )
    plan = {
        "name": cfg.name or out.resolve().name,
        "num_tasks": cfg.num_tasks,
        "config": dataset_config,
        "config_yaml": dump_yaml(cfg),
        "categories": reader.categories,
        **done,
    }
    atomic_write_json(plan_path(work, cfg.task_index, cfg.num_tasks), plan)
    if cfg.num_tasks == 1:
        return _report(finalize(out))
    log.info(
        "task %d of %d done; after all tasks finish run `fgcmr shard --merge --out=%s`",
        cfg.task_index,
        cfg.num_tasks,
        out,
    )
    return plan


def _prepare(work: Path, cfg: ShardConfig) -> dict:
    """Create the work directory and refuse one left by a different config."""
    dataset_config = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS}
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "config.json"
    if stamp.is_file():
        previous = read_json(stamp)
        if previous != dataset_config:
            changed = sorted(k for k in set(previous) | set(dataset_config) if previous.get(k) != dataset_config.get(k))
            raise ConfigError(
                f"{work.parent} holds shards made with a different config (changed: {', '.join(changed)}); "
                "use another --out or delete it"
            )
    else:
        atomic_write_json(stamp, dataset_config)
    return dataset_config


def _discard(out: Path, work: Path) -> None:
    """Remove what ``_prepare`` created for a corpus that turned out to be empty."""
    (work / "config.json").unlink(missing_ok=True)
    for path in (work, out):
        with contextlib.suppress(OSError):
            path.rmdir()


def _chunks(cfg: ShardConfig, reader: Reader) -> Iterator[Chunk]:
    """Cut the listing into per-split chunks of ``max_items_per_shard`` refs; duplicates become skips.

    Refs the listing already failed ride along in the current chunk without taking an item's place,
    so where a failed row sits in the input never moves a chunk boundary."""
    size = cfg.data.max_items_per_shard
    buffers: dict[str, list] = {}
    filled: collections.Counter = collections.Counter()
    counters: collections.Counter = collections.Counter()
    seen: set[str] | None = None if reader.unique_ids else set()
    for ref in reader.refs():
        split = cfg.holdout.split_of(ref)
        if split != ref.split:
            ref = dataclasses.replace(ref, split=split)
        if cfg.splits and ref.split not in cfg.splits:
            continue
        if make_key(ref.split) != ref.split:  # split names become file names
            ref = dataclasses.replace(ref, split=make_key(ref.split))
        if seen is not None and ref.skip is None:
            if ref.key in seen:
                ref = dataclasses.replace(
                    ref, skip=("duplicate_id", f"key {ref.key!r} already seen; the first occurrence wins")
                )
            else:
                seen.add(ref.key)
        buffer = buffers.setdefault(ref.split, [])
        buffer.append(ref)
        filled[ref.split] += ref.skip is None
        if filled[ref.split] == size:
            yield Chunk(ref.split, counters[ref.split], buffer, _snapshot(reader))
            counters[ref.split] += 1
            buffers[ref.split], filled[ref.split] = [], 0
    for split, buffer in buffers.items():
        if buffer:
            yield Chunk(split, counters[split], buffer, _snapshot(reader))


def _snapshot(reader: Reader) -> list[str] | None:
    return list(reader.categories) if reader.categories is not None else None


def _write_chunks(cfg: ShardConfig, reader: Reader, work: Path) -> dict:
    """Write this task's missing chunks; return every chunk of the corpus and the split order."""
    all_chunks: list[tuple[str, int]] = []
    splits: list[str] = []
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0"))
    written = 0
    total = None if cfg.splits else reader.total
    progress = Progress(total, f"shard {Path(cfg.out).name}", unit="item")
    pool = ProcessPoolExecutor(cfg.workers, initializer=_init_worker, initargs=(cfg,)) if cfg.workers > 1 else None
    pending: collections.deque[Future] = collections.deque()

    def collect(record: dict) -> None:
        nonlocal written
        progress.update(record["items_in"])
        written += 1
        if fail_after and written >= fail_after:
            log.warning("%s=%d: exiting abruptly (test hook)", FAIL_AFTER_ENV, fail_after)
            os._exit(75)

    try:
        for g, chunk in enumerate(_chunks(cfg, reader)):
            all_chunks.append((chunk.split, chunk.index))
            if chunk.split not in splits:
                splits.append(chunk.split)
            if g % cfg.num_tasks != cfg.task_index:
                continue
            record = verified_record(work, chunk.stem)
            if record is not None:
                progress.update(record["items_in"])
                continue
            if pool is None:
                collect(_write(reader, chunk, work, cfg.data))
                continue
            pending.append(pool.submit(_write_in_worker, chunk, str(work)))
            while len(pending) > 2 * cfg.workers:
                collect(pending.popleft().result())
        while pending:
            collect(pending.popleft().result())
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {"chunks": all_chunks, "splits": splits}


def _write(reader: Reader, chunk: Chunk, work: Path, data: DataOptions) -> dict:
    return write_chunk(
        chunk, work, reader.load, lambda item, cats: encode_sample(item, cats, data), data.max_bytes_per_shard
    )


_worker: dict = {}


def _init_worker(cfg: ShardConfig) -> None:
    _worker["reader"], _worker["data"] = make_reader(cfg), cfg.data


def _write_in_worker(chunk: Chunk, work: str) -> dict:
    return _write(_worker["reader"], chunk, Path(work), _worker["data"])


def _report(manifest: dict) -> dict:
    """Print the accounting equation (and skips by reason) that every run ends with."""
    line = (
        f"items_in {manifest['items_in']} = items_written {manifest['items_written']} "
        f"+ items_skipped {manifest['items_skipped']}"
    )
    if manifest["skipped"]:
        line += " (" + ", ".join(f"{reason}: {n}" for reason, n in manifest["skipped"].items()) + ")"
    splits = ", ".join(
        f"{s}: {info['items']} items in {len(info['shards'])} shards" for s, info in manifest["splits"].items()
    )
    print(f"{manifest['name']}: {splits}\n{line}", file=sys.stdout, flush=True)
    return manifest
