"""The real img2dataset 1.47.0 (tool venv from `make setup`) on Flickr8k photos served on 127.0.0.1, then
``fgcmr shard --source=img2dataset``: every row of the URL list accounted for, captions grouped per image."""

from __future__ import annotations

import csv
import io
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fgcmr.bench.img2dataset_corpus import img2dataset_bin, run_img2dataset, serve_directory
from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.shard.job import ShardConfig, run


@pytest.mark.slow
def test_real_img2dataset_output_is_sharded_with_every_row_accounted_for(data_root, tmp_path):
    assert img2dataset_bin() is not None, "img2dataset is not installed: run `make setup` (it makes .venv-img2dataset/)"
    flickr = data_root / "flickr8k_500"
    with open(flickr / "captions.txt", newline="") as f:
        captions = list(csv.DictReader(f))
    names = sorted({r["image"] for r in captions})[:4]
    www = tmp_path / "www"
    www.mkdir()
    for name in names:
        shutil.copy(flickr / "images" / name, www / name)
    (www / "truncated.jpg").write_bytes((flickr / "images" / names[0]).read_bytes()[:100])
    with serve_directory(www) as base:
        rows = [
            {
                "url": f"{base}/{r['image']}",
                "caption": r["caption"],
                "split": "test" if r["image"] == names[0] else "train",
            }
            for r in captions
            if r["image"] in names
        ]
        rows += [dict(rows[0]), {**rows[1], "caption": ""}]  # an exact duplicate caption, an empty one
        rows += [{"url": f"{base}/truncated.jpg", "caption": f"broken {k}", "split": "train"} for k in range(2)]
        rows.append({"url": f"{base}/no-such-image.jpg", "caption": "gone", "split": "train"})
        random.Random(0).shuffle(rows)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
        run_img2dataset(
            tmp_path / "urls.parquet",
            tmp_path / "i2d",
            extra_columns=["split"],
            image_size=64,
            samples_per_shard=8,
            threads=2,
        )
    assert len(list((tmp_path / "i2d").glob("*.tar"))) == 4  # 25 rows, 8 per shard
    m = run(ShardConfig(source="img2dataset", root=str(tmp_path / "i2d"), out=str(tmp_path / "shards")))
    assert m["rows"] == {
        "rows_in": 25,
        "rows_in_items": 20,
        "rows_skipped": 5,
        "skipped": {"decode_failed": 2, "download_failed": 1, "duplicate_caption": 1, "empty_text": 1},
    }
    assert m["items_written"] == 4 and {s: v["items"] for s, v in m["splits"].items()} == {"train": 3, "test": 1}
    ds = open_dataset(tmp_path / "shards")
    got = {
        s.meta["source"].rsplit("/", 1)[1]: s
        for split in ds.split_names
        for p in ds.shards(split)
        for s in iter_samples(p)
    }
    assert sorted(got) == names
    for name, sample in got.items():
        assert sample.texts == sorted(r["caption"].strip() for r in captions if r["image"] == name)
        assert sample.meta["split"] == ("test" if name == names[0] else "train")
        img = Image.open(io.BytesIO(sample.image))
        img.load()
        assert min(img.size) <= 64 < max(img.size) or max(img.size) <= 64  # img2dataset's resize, kept as it wrote it
