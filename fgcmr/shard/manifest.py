"""Assemble completed chunks into the final dataset directory: shards, manifest, sizes, skip log.

Runs at the end of a single-task job and as ``fgcmr shard --merge`` after a Slurm array. Each task
leaves a plan (``.parts/plan-<i>-of-<T>.json``) naming every chunk of the corpus in listing order;
merging checks that all tasks finished and every chunk verifies, then links the chunk parts, split by
split and in chunk order, onto sequential names ``<split>-NNNNNN.tar``. Linking is idempotent, so a
rerun rebuilds exactly the same directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from fgcmr.config import ConfigError
from fgcmr.io import atomic_open, atomic_write_json, atomic_write_text, read_json
from fgcmr.shard.config import WORK_DIR
from fgcmr.shard.writer import chunk_stem, verified_record


def plan_path(work: Path, task_index: int, num_tasks: int) -> Path:
    return work / f"plan-{task_index:05d}-of-{num_tasks:05d}.json"


def load_plan(work: Path) -> dict:
    """The corpus plan shared by all tasks, after checking that every task of the array has finished."""
    plans = sorted(work.glob("plan-*.json")) if work.is_dir() else []
    if not plans:
        raise FileNotFoundError(
            f"{work.parent}: no finished shard task found (no {WORK_DIR}/plan-*.json); run the shard tasks first"
        )
    plan = read_json(plans[0])
    num_tasks = plan["num_tasks"]
    missing = [i for i in range(num_tasks) if not plan_path(work, i, num_tasks).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{work.parent}: shard tasks {missing} of {num_tasks} have not finished; rerun them, then merge"
        )
    return plan


def finalize(out: Path) -> dict:
    """Verify every chunk, place the final shards, write manifest.json, sizes.json, skipped.jsonl;
    return the manifest."""
    work = out / WORK_DIR
    plan = load_plan(work)
    records = []
    for split, index in plan["chunks"]:
        record = verified_record(work, chunk_stem(split, index), check_hash=False)
        if record is None:
            raise ConfigError(
                f"{out}: chunk {chunk_stem(split, index)} is missing or incomplete; rerun the shard task that owns it"
            )
        records.append(record)
    for tmp in work.glob(".*.tmp"):  # left by killed runs; every task has finished, so none is in use
        tmp.unlink(missing_ok=True)
    splits = _place_shards(out, work, plan["splits"], records)
    skipped, rows_skipped = _write_skips(out, records)
    categories = plan["categories"] or []
    for info in splits.values():
        info["category_counts"] = {
            categories[int(k)]: n for k, n in sorted(info["category_counts"].items(), key=lambda kv: int(kv[0]))
        }
    items_in = sum(r["items_in"] for r in records)
    items_written = sum(info["items"] for info in splits.values())
    manifest = {
        "name": plan["name"],
        "source": plan["config"]["source"],
        "config": plan["config"],
        "categories": categories,
        "items_in": items_in,
        "items_written": items_written,
        "items_skipped": sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "splits": {s: info for s, info in splits.items() if info["items"]},
        # Input rows (caption records): a row corpus groups several rows into one item; else rows = items.
        "rows": {
            "rows_in": sum(r.get("rows_in", r["items_in"]) for r in records),
            "rows_in_items": sum(r.get("rows_written", r["items_written"]) for r in records),
            "rows_skipped": sum(rows_skipped.values()),
            "skipped": dict(sorted(rows_skipped.items())),
        },
    }
    assert manifest["items_in"] == manifest["items_written"] + manifest["items_skipped"], manifest
    rows = manifest["rows"]
    assert rows["rows_in"] == rows["rows_in_items"] + rows["rows_skipped"], rows
    sizes = {shard["file"]: shard["items"] for info in manifest["splits"].values() for shard in info["shards"]}
    atomic_write_json(out / "sizes.json", sizes)
    atomic_write_text(out / "config.yaml", plan["config_yaml"])
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _place_shards(out: Path, work: Path, split_order: list[str], records: list[dict]) -> dict:
    splits = {s: {"items": 0, "shards": [], "category_counts": Counter()} for s in split_order}
    for record in sorted(records, key=lambda r: (split_order.index(r["split"]), r["chunk"])):
        info = splits[record["split"]]
        for part in record["parts"]:
            name = f"{record['split']}-{len(info['shards']):06d}.tar"
            _link(work / part["file"], out / name)
            info["shards"].append(
                {"file": name, "items": part["items"], "bytes": part["bytes"], "sha256": part["sha256"]}
            )
            info["items"] += part["items"]
        info["category_counts"].update(record["category_counts"])
    return splits


def _link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically: a hard link where possible, else a copy."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_skips(out: Path, records: list[dict]) -> tuple[Counter, Counter]:
    """Write skipped.jsonl; return skipped items and skipped input rows, by reason."""
    counts: Counter = Counter()
    rows: Counter = Counter()
    with atomic_open(out / "skipped.jsonl", "w") as f:
        for record in records:
            for skip in record["skipped"]:
                f.write(json.dumps(skip, ensure_ascii=False) + "\n")
                counts[skip["reason"]] += 1
                rows[skip["reason"]] += skip.get("rows", 1)
    return counts, rows
