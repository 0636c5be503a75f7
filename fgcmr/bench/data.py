"""``fgcmr bench data``: the training input pipeline's samples/s vs the machine's decode ceiling.

Pipeline: the real ``fgcmr train`` loader (WebDataset over the shards, shuffle, decode, timm
transform, tokenisation, collation) with ``workers`` DataLoader workers. Ceiling: the same
per-sample work (``MakeItem``) on records already in memory, in one process per CPU core: what the
machine can decode at best with no I/O, no batching and no inter-process transfer.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import tarfile
import time

from fgcmr.config import Validated
from fgcmr.bench.host import machine
from fgcmr.dataset import open_dataset
from fgcmr.model import build_inputs
from fgcmr.train.config import DataConfig, load_model_config
from fgcmr.train.data import MakeItem, build_loader


@dataclasses.dataclass
class BenchDataConfig(Validated):
    shards: str  # dataset dir (fgcmr shard output)
    model: str = "tiny"  # configs/models/<name>.yaml or a path to one
    tokenizer: str | None = (
        None  # tokenizer dir (default: <shards>/../tokenizer is not assumed; one is trained in a temp dir)
    )
    split: str = "train"  # the split read
    workers: int = 2  # DataLoader workers
    micro_batch: int = 32  # samples per batch
    batches: int = 40  # measured batches
    augment: bool = True  # timm's training transform (else its eval transform)
    json: bool = False  # print one JSON object instead of the table


def _records(urls: list[str], limit: int) -> list[dict]:
    """Raw WebDataset-style records (``__key__``, ``__url__`` and field bytes) read into memory."""
    out: list[dict] = []
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, field = m.name.partition(".")
                if not out or out[-1]["__key__"] != key:
                    out.append({"__key__": key, "__url__": url})
                out[-1][field] = tar.extractfile(m).read()
        if len(out) >= limit:
            break
    return out[:limit]


_item = None


def _init(make_item: MakeItem) -> None:
    global _item
    _item = make_item


def _decode(records: list[dict]) -> int:
    return sum(_item(r) is not None for r in records)


def decode_ceiling(make_item: MakeItem, records: list[dict], seconds: float = 5.0) -> float:
    procs = os.cpu_count() or 1
    chunks = [records[i::procs] for i in range(procs)]
    with mp.get_context("fork").Pool(procs, initializer=_init, initargs=(make_item,)) as pool:
        pool.map(_decode, chunks)  # warm-up
        done, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            done += sum(pool.map(_decode, chunks))
        return done / (time.perf_counter() - t)


def run(cfg: BenchDataConfig) -> dict:
    import tempfile

    from fgcmr.model import bind_tokenizer, fit_tokenizer

    dataset = open_dataset(cfg.shards)
    model_cfg = load_model_config(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        if model_cfg.text.kind == "transformers" and not model_cfg.tokenizer_dir:
            records = _records([str(p) for p in dataset.shards(cfg.split)], 2000)
            texts = (t for r in records for t in json.loads(r["json"])["texts"])
            text = model_cfg.text
            model_cfg.text = (
                bind_tokenizer(text, cfg.tokenizer) if cfg.tokenizer else fit_tokenizer(text, texts, f"{tmp}/tokenizer")
            )
        inputs = build_inputs(model_cfg, train=cfg.augment)
        data = DataConfig(micro_batch=cfg.micro_batch, workers=cfg.workers, split=cfg.split, augment=cfg.augment)
        loader = build_loader(dataset, inputs, data, world_size=1, batches_per_rank=1 << 30, seed=0)
        it = iter(loader)
        for _ in range(max(4, cfg.workers * 2)):  # workers started, prefetch queues full
            next(it)
        t = time.perf_counter()
        for _ in itertools.islice(it, cfg.batches):
            pass
        pipeline = cfg.batches * cfg.micro_batch / (time.perf_counter() - t)
        del it, loader
        ceiling = decode_ceiling(MakeItem(inputs, None, 0), _records([str(p) for p in dataset.shards(cfg.split)], 512))
    result = {
        "pipeline_samples_per_s": pipeline,
        "decode_ceiling_samples_per_s": ceiling,
        "ratio": pipeline / ceiling,
        "workers": cfg.workers,
        "cpus": os.cpu_count(),
        "model": cfg.model,
        "augment": cfg.augment,
        "machine": machine(),
    }
    if cfg.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"machine: {result['machine']}\n"
            f"input pipeline ({cfg.workers} workers): {pipeline:8.1f} samples/s\n"
            f"decode ceiling ({os.cpu_count()} procs) : {ceiling:8.1f} samples/s\n"
            f"ratio                         : {result['ratio']:.3f}",
            flush=True,
        )
    return result
