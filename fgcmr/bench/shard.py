"""``fgcmr bench shard``: the sharder's items/s next to a plain loop, and its peak memory.

``--source=synthetic``: both sides do the same work per item (generate the synthetic image and
captions, write the image, json and first caption as tar members); the sharder additionally decodes
every image to verify it, hashes every shard, and keeps resumable chunk records. Peak memory is the
maximum resident set size of a ``fgcmr shard`` child process at two corpus sizes.

``--source=img2dataset``: for each corpus size in ``rows`` (default 10k and 1M), an img2dataset-format
corpus (``fgcmr.bench.img2dataset_corpus``: 5 rows per image, shuffled, ~3 % failed rows) is generated,
then sharded by a ``fgcmr shard --source=img2dataset`` child process (grouping across the corpus,
verifying each image) and read by plain ``webdataset`` iteration of the same tars. Both rates count
tar samples (successful rows) per second; peak RSS of the shard process must stay flat (≤ 1.25×).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Literal

from fgcmr.config import Validated
from fgcmr.shard.job import ShardConfig, run as shard_run
from fgcmr.shard.readers.synthetic import SyntheticReader


@dataclasses.dataclass
class BenchShardConfig(Validated):
    # the corpus sharded: synthetic images, or an img2dataset output
    source: Literal["synthetic", "img2dataset"] = "synthetic"
    rows: list[int] = dataclasses.field(default_factory=lambda: [10_000, 1_000_000])  # img2dataset: corpus sizes
    items: int = 1000  # throughput corpus size
    image_size: int = 224  # synthetic image side in pixels (throughput corpus)
    workers: int = 1  # sharding processes
    max_items_per_shard: int = 500  # items per shard
    # corpus sizes whose peak memory is compared
    memory_items: list[int] = dataclasses.field(default_factory=lambda: [10_000, 100_000])
    memory_image_size: int = 32  # image side of those corpora
    out: str | None = None  # scratch directory (default: a temporary one, removed afterwards)
    json: bool = False  # print one JSON object instead of the table

    def validate(self) -> None:
        if len(self.memory_items) != 2 or min(self.memory_items) < 1:
            raise ValueError(f"memory_items={self.memory_items} must be two positive corpus sizes")
        if self.items < 1 or self.workers < 1:
            raise ValueError("items and workers must be positive")


def run(cfg: BenchShardConfig) -> dict:
    if cfg.source == "img2dataset":
        return run_img2dataset(cfg)
    with tempfile.TemporaryDirectory(dir=cfg.out) as scratch:
        scratch = Path(scratch)
        fgcmr_rate = _time_fgcmr(cfg, scratch / "fgcmr")
        plain_rate = _time_plain(cfg, scratch / "plain")
        small, large = (_peak_rss_mb(n, cfg.memory_image_size, scratch / f"mem{n}") for n in cfg.memory_items)
    from fgcmr.bench.host import machine

    result = {
        "items": cfg.items,
        "image_size": cfg.image_size,
        "workers": cfg.workers,
        "items_per_s": round(fgcmr_rate, 1),
        "plain_tarfile_items_per_s": round(plain_rate, 1),
        "ratio": round(fgcmr_rate / plain_rate, 3),
        "items_small": cfg.memory_items[0],
        "items_large": cfg.memory_items[1],
        "memory_image_size": cfg.memory_image_size,
        "peak_mb_small": round(small, 1),
        "peak_mb_large": round(large, 1),
        "machine": machine(),
    }
    if cfg.json:
        print(json.dumps(result))
    else:
        print(
            f"fgcmr bench shard on {result['machine']}\n"
            f"  synthetic {cfg.image_size}-px items, {cfg.items} items, workers={cfg.workers}\n"
            f"  fgcmr shard    {fgcmr_rate:9.1f} items/s\n"
            f"  plain tarfile  {plain_rate:9.1f} items/s (1 process)\n"
            f"  ratio          {result['ratio']:9.3f}\n"
            f"  peak RSS of `fgcmr shard` ({cfg.memory_image_size} px): {cfg.memory_items[0]} items {small:.1f} MB, "
            f"{cfg.memory_items[1]} items {large:.1f} MB"
        )
    return result


def _time_fgcmr(cfg: BenchShardConfig, out: Path) -> float:
    shard = ShardConfig(
        source="synthetic", out=str(out), items=cfg.items, image_size=cfg.image_size, workers=cfg.workers
    )
    shard.data.max_items_per_shard = cfg.max_items_per_shard
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # keep stdout for the result (one JSON object with --json)
        shard_run(shard)
    return cfg.items / (time.perf_counter() - start)


def _time_plain(cfg: BenchShardConfig, out: Path) -> float:
    """The baseline: generate each item and add its members to tars with plain ``tarfile``."""
    out.mkdir(parents=True)
    reader = SyntheticReader(cfg.items, image_size=cfg.image_size)
    start = time.perf_counter()
    tar = None
    for n, ref in enumerate(reader.refs()):
        if n % cfg.max_items_per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(out / f"{n // cfg.max_items_per_shard:06d}.tar", "w")
        item = reader.load(ref)
        meta = json.dumps({"id": item.id, "split": item.split, "category": item.category, "texts": item.texts}).encode()
        for name, data in (
            (f"{ref.key}.jpg", item.image),
            (f"{ref.key}.json", meta),
            (f"{ref.key}.txt", item.texts[0].encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar.close()
    return cfg.items / (time.perf_counter() - start)


def run_img2dataset(cfg: BenchShardConfig) -> dict:
    from fgcmr.bench.img2dataset_corpus import write_img2dataset_corpus

    results = []
    for rows in cfg.rows:
        with tempfile.TemporaryDirectory(dir=cfg.out) as scratch:
            corpus = Path(scratch) / "i2d"
            t = time.perf_counter()
            truth = write_img2dataset_corpus(corpus, rows)
            made = time.perf_counter() - t
            cmd = [
                sys.executable,
                "-m",
                "fgcmr",
                "shard",
                "--source=img2dataset",
                f"--root={corpus}",
                f"--out={Path(scratch) / 'out'}",
                f"--workers={cfg.workers}",
                f"--data.max_items_per_shard={cfg.max_items_per_shard}",
            ]
            t = time.perf_counter()
            peak = _child_peak_rss_mb(cmd)
            shard_s = time.perf_counter() - t
            manifest = json.loads((Path(scratch) / "out" / "manifest.json").read_text())
            if manifest["rows"]["rows_in"] != rows or manifest["items_written"] != truth["images"]:
                raise RuntimeError(f"accounting mismatch: {manifest['rows']} vs {truth}")
            t = time.perf_counter()
            samples = _iterate_webdataset(sorted(str(p) for p in corpus.glob("*.tar")))
            wds_s = time.perf_counter() - t
        results.append(
            {
                "rows": rows,
                "samples": samples,
                "items": manifest["items_written"],
                "rows_skipped": manifest["rows"]["skipped"],
                "generate_s": round(made, 1),
                "shard_s": round(shard_s, 1),
                "shard_samples_per_s": round(samples / shard_s, 1),
                "shard_items_per_s": round(manifest["items_written"] / shard_s, 1),
                "peak_mb": round(peak, 1),
                "webdataset_s": round(wds_s, 1),
                "webdataset_samples_per_s": round(samples / wds_s, 1),
                "ratio": round(wds_s / shard_s, 3),
            }
        )
    from fgcmr.bench.host import machine

    result = {
        "source": "img2dataset",
        "workers": cfg.workers,
        "sizes": results,
        "peak_growth": round(results[-1]["peak_mb"] / results[0]["peak_mb"], 3),
        "machine": machine(),
    }
    if cfg.json:
        print(json.dumps(result))
        return result
    print(f"fgcmr bench shard --source=img2dataset on {result['machine']} (workers={cfg.workers})")
    print(
        f"  {'rows':>9} {'samples':>9} {'items':>8} {'shard s':>8} {'samples/s':>10} {'items/s':>8} {'peak MB':>8}"
        f" {'wds s':>7} {'wds samples/s':>13} {'ratio':>6}"
    )
    for r in results:
        print(
            f"  {r['rows']:>9} {r['samples']:>9} {r['items']:>8} {r['shard_s']:>8} {r['shard_samples_per_s']:>10}"
            f" {r['shard_items_per_s']:>8} {r['peak_mb']:>8} {r['webdataset_s']:>7}"
            f" {r['webdataset_samples_per_s']:>13} {r['ratio']:>6}"
        )
    print(f"  peak RSS growth {cfg.rows[0]} → {cfg.rows[-1]} rows: {result['peak_growth']}×")
    return result


def _iterate_webdataset(urls: list[str]) -> int:
    """Plain WebDataset iteration of the tars (every sample's members read, nothing decoded)."""
    import webdataset as wds

    n = 0
    for _ in wds.WebDataset(urls, shardshuffle=False):
        n += 1
    return n


_REPORT_HWM = (  # runs a command's module and reports its own peak RSS: wait4's ru_maxrss can include the
    # parent's memory (vfork before exec), which here holds the corpus generator and webdataset's buffers
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "    sys.stderr.write('\\nVmHWM_KB=' + hwm[0].split()[1] + '\\n')\n"
)


def _child_peak_rss_mb(cmd: list[str]) -> float:
    """Run ``[python, -m, module, args...]`` and return its peak resident memory (VmHWM) in MB."""
    proc = subprocess.run(
        [cmd[0], "-c", _REPORT_HWM, *cmd[2:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return int(proc.stderr.rsplit("VmHWM_KB=", 1)[1].split()[0]) / 1024


def _peak_rss_mb(items: int, image_size: int, out: Path) -> float:
    """Peak resident memory of a ``fgcmr shard`` child process sharding ``items`` synthetic items."""
    cmd = [
        sys.executable,
        "-m",
        "fgcmr",
        "shard",
        "--source=synthetic",
        f"--out={out}",
        f"--items={items}",
        f"--image_size={image_size}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux
