"""Row corpora (img2dataset output, WebDataset, CSV/JSONL/parquet): grouping across the corpus, row
accounting, order independence and bounded-memory partitioning."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fgcmr.bench.img2dataset_corpus import caption_of, url_of, ustar_member, write_img2dataset_corpus
from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.shard import grouping
from fgcmr.shard.job import ShardConfig, run


def shard_bytes(root: Path) -> dict[str, str]:
    """sha256 of every shard of a dataset, by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


def samples(root: Path, split: str = "train") -> list:
    ds = open_dataset(root)
    return [s for path in ds.shards(split) for s in iter_samples(path)]


def _shard(tmp_path: Path, name: str, **kw) -> dict:
    cfg = ShardConfig(out=str(tmp_path / name), **kw)
    cfg.data.max_items_per_shard = 16
    return run(cfg)


def test_img2dataset_grouped_accounted_and_order_independent(tmp_path):
    truths = [
        write_img2dataset_corpus(
            tmp_path / f"i2d{seed}",
            400,
            fail_fraction=0.1,
            samples_per_shard=150,
            shuffle_seed=seed,
            extra_columns={"split": lambda i, k: "test" if i % 4 == 0 else "train"},
        )
        for seed in (0, 1)
    ]
    assert truths[0] == truths[1] and truths[0]["failed"]  # same rows, other order (so other keys and tars)
    truth = truths[0]
    m = _shard(tmp_path, "a", source="img2dataset", root=str(tmp_path / "i2d0"))
    assert m["rows"] == {
        "rows_in": 400,
        "rows_in_items": truth["success"],
        "rows_skipped": 400 - truth["success"],
        "skipped": {
            "download_failed": truth["failed"]["failed_to_download"],
            "decode_failed": truth["failed"]["failed_to_resize"],
        },
    }
    assert m["items_written"] == truth["images"] and set(m["splits"]) == {"train", "test"}
    by_url = {s.meta["source"]: s for split in ("train", "test") for s in samples(tmp_path / "a", split)}
    assert len(by_url) == truth["images"]
    ok = {}
    for path in sorted((tmp_path / "i2d0").glob("*.parquet")):
        for r in pq.read_table(path).to_pylist():
            if r["status"] == "success":
                ok.setdefault(r["url"], []).append(r["caption"])
    for url, captions in ok.items():  # every caption of an image, in one sample, wherever its rows were
        assert by_url[url].texts == sorted(captions)
    image = int(next(iter(ok))[-12:-4])
    assert (by_url[url_of(image)].meta["split"] == "test") == (image % 4 == 0)
    assert caption_of(image, 0) in by_url[url_of(image)].texts or len(ok[url_of(image)]) < 5
    # shuffled rows, several workers, a two-task array + merge: byte-identical shards
    _shard(tmp_path, "b", source="img2dataset", root=str(tmp_path / "i2d1"), workers=2)
    for task in (0, 1):
        _shard(tmp_path, "c", source="img2dataset", root=str(tmp_path / "i2d1"), num_tasks=2, task_index=task)
    _shard(tmp_path, "c", source="img2dataset", root=str(tmp_path / "i2d1"), merge=True)
    want = shard_bytes(tmp_path / "a")
    assert len(want) > 4 and shard_bytes(tmp_path / "b") == want and shard_bytes(tmp_path / "c") == want


def test_partitions_resplit_when_large_without_changing_output(tmp_path, monkeypatch):
    write_img2dataset_corpus(tmp_path / "i2d", 300, samples_per_shard=300)
    _shard(tmp_path, "big", source="img2dataset", root=str(tmp_path / "i2d"))
    monkeypatch.setattr(grouping, "MAX_PARTITION_BYTES", 600)  # a few rows per partition: re-split twice
    seen = []
    original = grouping._partition_groups
    monkeypatch.setattr(grouping, "_partition_groups", lambda path: (seen.append(path.stem), original(path))[1])
    _shard(tmp_path, "small", source="img2dataset", root=str(tmp_path / "i2d"))
    assert max(len(stem) for stem in seen) >= 4
    assert shard_bytes(tmp_path / "small") == shard_bytes(tmp_path / "big")


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_webdataset_source_groups_by_url_sha256_or_not(tmp_path):
    red, blue = _jpeg((200, 0, 0)), _jpeg((0, 0, 200))
    samples_in = [  # (key, members)
        ("a1", {"png": red, "json": {"url": "http://x/red", "caption": "a red square", "split": "val"}}),
        ("b1", {"webp": blue, "json": {"url": "http://x/blue", "caption": "blue"}}),
        ("a2", {"png": red, "json": {"url": "http://x/red", "caption": "a red square"}}),  # duplicate caption
        ("a3", {"png": red, "json": {"url": "http://x/red2", "caption": "red again"}}),  # same bytes, other url
        ("b2", {"webp": blue, "json": {"url": "http://x/blue", "caption": "  "}}),  # empty caption
        ("c1", {"json": {"url": "http://x/none", "caption": "no image"}}),  # no image member
    ]
    root = tmp_path / "wds"
    root.mkdir()
    for n, part in enumerate((samples_in[:3], samples_in[3:])):
        data = b"".join(
            ustar_member(f"{key}.{ext}", json.dumps(v).encode() if ext == "json" else v)
            for key, members in part
            for ext, v in members.items()
        )
        (root / f"part-{n}.tar").write_bytes(data + bytes(1024))
    base = dict(source="webdataset", root=str(root), text_field="json.caption")
    m = _shard(tmp_path, "url", **base)
    assert m["rows"] == {
        "rows_in": 6,
        "rows_in_items": 3,
        "rows_skipped": 3,
        "skipped": {"duplicate_caption": 1, "empty_text": 1, "missing_image": 1},
    }
    got = {
        s.meta["source"]: (s.meta["split"], s.texts, s.image_ext)
        for split in ("train", "val")
        for s in samples(tmp_path / "url", split)
    }
    assert got == {
        "http://x/red": ("val", ["a red square"], "jpg"),
        "http://x/blue": ("train", ["blue"], "jpg"),
        "http://x/red2": ("train", ["red again"], "jpg"),
    }  # JPEG bytes named .png/.webp: stored as what they are
    m = _shard(tmp_path, "sha", **base, group_by="sha256")
    (red_item,) = [s for split in ("train", "val") for s in samples(tmp_path / "sha", split) if s.image == red]
    assert (
        sorted(red_item.texts) == ["a red square", "red again"]
        and red_item.meta["id"] == hashlib.sha256(red).hexdigest()[:20]
    )
    m = _shard(tmp_path, "none", **base, group_by="none")
    assert m["items_written"] == 4 and m["rows"]["skipped"] == {"empty_text": 1, "missing_image": 1}


def _tabular_rows(tmp_path: Path) -> list[dict]:
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(12):
        (tmp_path / "images" / f"im{i}.jpg").write_bytes(_jpeg((i * 20, 100, 50)))
        rows += [
            {
                "img": f"im{i}.jpg",
                "cap": f"caption {k} of {i}",
                "sp": "test" if i < 3 else "train",
                "cat": "odd" if i % 2 else "even",
            }
            for k in range(3)
        ]
    rows.append({"img": "im5.jpg", "cap": "", "sp": "train", "cat": "odd"})  # empty: a counted skip, not dropped
    rows.append({"img": "gone.jpg", "cap": "its image is missing", "sp": "train", "cat": "odd"})
    return rows


def test_tabular_sources_group_across_file_whatever_the_format_or_order(tmp_path):
    rows = _tabular_rows(tmp_path)
    cols = dict(image_col="img", caption_col="cap", split_col="sp", category_col="cat", images=str(tmp_path / "images"))
    outs = []
    for n, seed in enumerate((None, 1, 2)):
        order = list(rows)
        if seed is not None:
            random.Random(seed).shuffle(order)
        if n == 0:
            pq.write_table(
                pa.Table.from_pylist(order), tmp_path / "list.parquet", row_group_size=7
            )  # several row groups
            path, source = tmp_path / "list.parquet", "parquet"
        elif n == 1:
            path, source = tmp_path / "list.csv", "csv"
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(order)
        else:
            path, source = tmp_path / "list.jsonl", "jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in order))
        m = _shard(tmp_path, f"t{n}", source=source, root=str(path), **cols)
        assert m["categories"] == ["even", "odd"]
        assert m["rows"] == {
            "rows_in": 38,
            "rows_in_items": 36,
            "rows_skipped": 2,
            "skipped": {"empty_text": 1, "missing_image": 1},
        }
        assert {s: v["items"] for s, v in m["splits"].items()} == {"train": 9, "test": 3}
        outs.append(shard_bytes(tmp_path / f"t{n}"))
    assert outs[0] == outs[1] == outs[2]  # parquet, shuffled CSV and shuffled JSONL: the same shards
    five = [s for s in samples(tmp_path / "t0") if s.meta["id"] == "im5"][0]
    assert five.texts == ["caption 0 of 5", "caption 1 of 5", "caption 2 of 5"] and five.meta["category_name"] == "odd"


def test_tabular_wrong_columns_name_the_file(tmp_path):
    pq.write_table(pa.table({"path": ["a.jpg"], "text": ["x"]}), tmp_path / "list.parquet")
    from fgcmr.config import ConfigError

    with pytest.raises(ConfigError, match=r"list.parquet: needs columns \['caption', 'image'\]"):
        _shard(tmp_path, "o", source="parquet", root=str(tmp_path / "list.parquet"))


def test_two_images_with_one_key_the_second_is_a_counted_duplicate(tmp_path):
    (tmp_path / "images").mkdir()
    for name, colour in (("a.jpg", (10, 10, 10)), ("a.png", (200, 200, 200))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "images" / name)
    rows = [
        {"image": "a.jpg", "caption": "dark"},
        {"image": "a.png", "caption": "light"},
        {"image": "a.png", "caption": "pale"},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = _shard(tmp_path, "o", source="jsonl", root=str(tmp_path / "list.jsonl"))
    assert m["items_written"] == 1 and m["rows"]["skipped"] == {"duplicate_id": 2}  # both rows of the second image
    assert not (tmp_path / "o" / ".parts" / "spill-0").exists()  # spill files go once read
