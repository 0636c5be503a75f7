"""``fgcmr bench label``: label inference samples/s against a bare forward loop, in one run.

Both sides embed the same texts of the same shards in the same batches with the same encoder:
the infer side runs the real code path (read the tar and tokenise on a helper thread, batch by length,
embed, write the sidecar), the bare side only calls the model on batches prepared beforehand. The ratio says how much
of the encoder's speed the job delivers. Each side runs ``repeats`` times, alternating; the best counts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch

from fgcmr.config import Validated
from fgcmr.bench.host import sync
from fgcmr.dataset import open_dataset
from fgcmr.distributed import init
from fgcmr.label.infer import LabelInferConfig, label_shards
from fgcmr.label.model import autocast, load_labeler
from fgcmr.label.stream import ShardEnd, TextBatch, shard_items


@dataclasses.dataclass
class BenchLabelConfig(Validated):
    shards: str  # dataset dir (fgcmr shard output)
    labeler: str  # labeler dir (fgcmr label train output)
    split: str = "train"  # the split whose texts are labelled
    max_shards: int = 2  # shards of it read at most
    batch_size: int = 64  # texts per forward
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # compute precision; auto: fp32 on CPU, bf16 on CUDA
    repeats: int = 2  # runs per side, alternating; the best counts
    json: bool = False  # print one JSON object instead of the table
    threads: int | None = None  # torch CPU threads per rank (default: cores / local ranks)


def run(cfg: BenchLabelConfig) -> dict:
    d = init(cfg.threads)
    model, tokenizer, max_length = load_labeler(cfg.labeler)
    model.to(d.device)
    shards = open_dataset(cfg.shards).shards(cfg.split)[: cfg.max_shards]
    window = LabelInferConfig.window_batches
    items = [item for s in shards for item in shard_items(s, tokenizer, max_length, cfg.batch_size, window)]
    samples = sum(len(item.data.keys) for item in items if isinstance(item, ShardEnd))
    batches = [item.batch[1] for item in items if isinstance(item, TextBatch)]

    @torch.inference_mode()
    def bare() -> None:
        with autocast(d.device, cfg.dtype):
            for b in batches:
                model(**{k: v.to(d.device, non_blocking=True) for k, v in b.items()})
        sync(d.device)

    with tempfile.TemporaryDirectory() as tmp:
        _link_dataset(Path(cfg.shards), Path(tmp))
        infer_cfg = LabelInferConfig(
            shards=tmp,
            labeler=cfg.labeler,
            name="bench",
            batch_size=cfg.batch_size,
            dtype=cfg.dtype,
            window_batches=window,
        )

        def infer() -> None:
            shutil.rmtree(Path(tmp) / "labels", ignore_errors=True)
            label_shards(model, tokenizer, max_length, [Path(tmp) / s.name for s in shards], infer_cfg, d)
            sync(d.device)

        bare()  # warm-up: allocator, kernels, thread pool
        times = {"infer": [], "bare": []}
        for _ in range(cfg.repeats):
            for name, fn in (("bare", bare), ("infer", infer)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    result = {
        "samples": samples,
        "batches": len(batches),
        "batch_size": cfg.batch_size,
        "device": d.device.type,
        "dtype": cfg.dtype,
        "infer_samples_per_s": samples / min(times["infer"]),
        "bare_samples_per_s": samples / min(times["bare"]),
    }
    result["ratio"] = result["infer_samples_per_s"] / result["bare_samples_per_s"]
    if cfg.json:
        print(json.dumps(result))
    else:
        print(
            f"label infer : {result['infer_samples_per_s']:10.1f} samples/s\n"
            f"bare forward: {result['bare_samples_per_s']:10.1f} samples/s\n"
            f"ratio       : {result['ratio']:10.3f}  ({samples} samples, {len(batches)} batches of "
            f"≤{cfg.batch_size}, {d.device.type}, {cfg.dtype})"
        )
    return result


def _link_dataset(src: Path, dst: Path) -> None:
    """A scratch dataset dir whose files are links to ``src``, so the bench's sidecars land in a temp dir."""
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).symlink_to(f.resolve())
