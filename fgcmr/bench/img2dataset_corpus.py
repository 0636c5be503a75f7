"""Corpora in img2dataset's output format: generated (tests, the shard benchmark) or made by the real tool.

``NNNNN.tar`` (``{key}.jpg``, ``{key}.txt``, ``{key}.json``), ``NNNNN.parquet`` (every row of the URL
list, failed ones with ``status`` and ``error_message``) and ``NNNNN_stats.json``, as img2dataset
1.47.0 writes them with ``--output_format=webdataset``: one sample per (url, caption) row, keys
``{shard:05d}{row:04d}``. Images are tiny procedural JPEGs, ``rows_per_image`` rows share a url, the
rows are shuffled by ``shuffle_seed`` (None keeps url order), and a ``fail_fraction`` of rows failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

ERRORS = [
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "<urlopen error timed out>"),
    ("failed_to_resize", "image decode failed: cannot identify image file"),
]
WORDS = "a dog cat man woman child red blue green small large runs sits on in near the ball grass water street".split()


def url_of(image: int) -> str:
    return f"http://images.example/{image:08d}.jpg"


def caption_of(image: int, k: int) -> str:
    rng = random.Random(image * 131 + k)
    return " ".join(rng.choice(WORDS) for _ in range(6)) + f" #{image}.{k}"


def jpeg_of(image: int, size: int) -> bytes:
    rng = np.random.default_rng(image)
    pixels = (rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)).repeat(size // 2, 0).repeat(size // 2, 1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def ustar_member(name: str, data: bytes) -> bytes:
    """One tar member (ustar header + data padded to 512 bytes); ``tarfile`` is too slow for a 1M-row corpus."""
    h = bytearray(512)
    h[0 : len(name)] = name.encode()
    h[100:124] = b"0000644\x000000000\x000000000\x00"
    h[124:136] = b"%011o\x00" % len(data)
    h[136:148] = b"00000000000\x00"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h) + data + bytes(-len(data) % 512)


def write_img2dataset_corpus(
    out: str | Path,
    rows: int,
    rows_per_image: int = 5,
    fail_fraction: float = 0.03,
    samples_per_shard: int = 10_000,
    image_size: int = 16,
    shuffle_seed: int | None = 0,
    extra_columns: dict | None = None,
) -> dict:
    """Write the corpus; return what a reader must find: rows, success rows, images, failed rows by status.

    ``extra_columns``: name → function(image, k) of saved additional columns (e.g. a split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    order = [(i // rows_per_image, i % rows_per_image) for i in range(rows)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    fail_rng = random.Random(12345)
    failed = {i for i in range(rows) if fail_rng.random() < fail_fraction}  # by row of the url list, not position
    extra_columns = extra_columns or {}
    summary = {"rows": rows, "success": 0, "failed": {}, "images": set()}
    jpegs: dict[int, bytes] = {}
    for shard, start in enumerate(range(0, rows, samples_per_shard)):
        table = {
            c: []
            for c in (
                "url",
                "caption",
                *extra_columns,
                "key",
                "status",
                "error_message",
                "width",
                "height",
                "original_width",
                "original_height",
                "sha256",
            )
        }
        with open(out / f"{shard:05d}.tar", "wb") as tar:
            for n, (image, k) in enumerate(order[start : start + samples_per_shard]):
                key = f"{shard:05d}{n:04d}"
                row = {
                    "url": url_of(image),
                    "caption": caption_of(image, k),
                    "key": key,
                    **{c: f(image, k) for c, f in extra_columns.items()},
                }
                if image * rows_per_image + k in failed:
                    status, error = ERRORS[(image + k) % len(ERRORS)]
                    row.update(
                        status=status,
                        error_message=error,
                        width=None,
                        height=None,
                        original_width=None,
                        original_height=None,
                        sha256=None,
                    )
                    summary["failed"][status] = summary["failed"].get(status, 0) + 1
                else:
                    data = jpegs.get(image) or jpegs.setdefault(image, jpeg_of(image, image_size))
                    row.update(
                        status="success",
                        error_message=None,
                        width=image_size,
                        height=image_size,
                        original_width=image_size,
                        original_height=image_size,
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                    meta = json.dumps({c: row[c] for c in table}).encode()
                    for ext, payload in (("jpg", data), ("txt", row["caption"].encode()), ("json", meta)):
                        tar.write(ustar_member(f"{key}.{ext}", payload))
                    summary["success"] += 1
                    summary["images"].add(image)
                for c in table:
                    table[c].append(row[c])
                if len(jpegs) > 50_000:  # bound the cache; an image is regenerated identically
                    jpegs.clear()
            tar.write(bytes(1024))  # end-of-archive
        pq.write_table(pa.table(table), out / f"{shard:05d}.parquet")
        stats = {
            "count": len(table["key"]),
            "successes": table["status"].count("success"),
            **{status: table["status"].count(status) for status in ("failed_to_download", "failed_to_resize")},
        }
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    summary["images"] = len(summary["images"])
    return summary


# --- The real img2dataset, run as a subprocess from its own venv (it needs webdataset 0.2.x) -----------------

IMG2DATASET_ENV = "FGCMR_IMG2DATASET"  # path of the img2dataset executable; default .venv-img2dataset/bin/img2dataset


def img2dataset_bin() -> Path | None:
    """The tool venv's img2dataset (made by `make setup`), or None when it is not installed."""
    import os

    path = Path(
        os.environ.get(IMG2DATASET_ENV) or Path(__file__).resolve().parents[2] / ".venv-img2dataset/bin/img2dataset"
    )
    return path if path.is_file() else None


@contextlib.contextmanager
def serve_directory(directory: str | Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_img2dataset(
    url_list: str | Path,
    out: str | Path,
    *,
    extra_columns: list[str] = (),
    image_size: int = 256,
    samples_per_shard: int = 10_000,
    threads: int = 4,
) -> None:
    """Run the real img2dataset (``--output_format=webdataset``) on a parquet URL list with url/caption columns.

    Offline it needs ``NO_ALBUMENTATIONS_UPDATE=1``; ``out`` must not exist yet (its default incremental
    mode on an empty folder: ``--incremental_mode=overwrite`` deletes its own ``_tmp/`` in 1.47.0)."""
    import os
    import subprocess

    tool = img2dataset_bin()
    if tool is None:
        raise FileNotFoundError(f"img2dataset not installed: run `make setup` (or set {IMG2DATASET_ENV})")
    if Path(out).exists():
        raise FileExistsError(f"{out} exists; img2dataset needs an empty output folder")
    cmd = [
        str(tool),
        f"--url_list={url_list}",
        "--input_format=parquet",
        "--url_col=url",
        "--caption_col=caption",
        "--output_format=webdataset",
        f"--output_folder={out}",
        "--processes_count=1",
        f"--thread_count={threads}",
        f"--image_size={image_size}",
        "--resize_mode=keep_ratio",
        "--resize_only_if_bigger=True",
        f"--number_sample_per_shard={samples_per_shard}",
        "--retries=0",
        "--timeout=30",
        "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]
    if extra_columns:
        cmd.append(f"--save_additional_columns={json.dumps(list(extra_columns))}")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}): {proc.stderr[-3000:]}")


def flickr8k_url_list(
    flickr_root: str | Path, base_url: str, out: str | Path, images: int | None = None, seed: int = 0
) -> dict:
    """A shuffled parquet URL list of Flickr8k's caption rows (url, caption, split) served under ``base_url``,
    plus one 404 row; returns the counts a reader must find."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    flickr_root = Path(flickr_root)
    with open(flickr_root / "splits.csv", newline="") as f:
        splits = {r["image"]: r["flickr8k_split"] for r in csv.DictReader(f)}
    with open(flickr_root / "captions.txt", newline="") as f:
        captions = list(csv.DictReader(f))
    keep = sorted({r["image"] for r in captions})[:images]
    rows = [
        {"url": f"{base_url}/{r['image']}", "caption": r["caption"], "split": splits.get(r["image"], "none")}
        for r in captions
        if r["image"] in set(keep)
    ]
    rows.append({"url": f"{base_url}/no-such-image.jpg", "caption": "a photo that is gone", "split": "train"})
    random.Random(seed).shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return {"rows": len(rows), "images": keep}
