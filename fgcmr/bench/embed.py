"""``fgcmr bench embed``: ``fgcmr embed`` samples/s against a bare forward of the same towers, in one run.

Both sides embed the same images and captions of the same shards in the same batches with the same
export: the embed side runs the job's code path (read the tar, decode, transform and tokenise on the
reader thread, normalise, embed, write the parts atomically), the bare side only calls
``encode_image`` + ``encode_text`` on batches prepared (decoded, normalised, collated) beforehand.
Each side runs ``repeats`` times, alternating. ``ratio`` is the median of the rounds' paired ratios
(bare time / embed time of the same round): on a machine shared with other jobs, load that comes and
goes hits both sides of a round alike, where best-of-each can pair a lucky bare round with an unlucky
embed round. The best samples/s of each side are printed beside it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fgcmr.config import Validated
from fgcmr.bench.host import sync
from fgcmr.dataset import open_dataset
from fgcmr.distributed import init
from fgcmr.io import sha256_file
from fgcmr.model.inputs import Batch, move
from fgcmr.retrieval.embed import EmbedConfig, embed_parts, plan, read_batches, write_parts


@dataclasses.dataclass
class BenchEmbedConfig(Validated):
    export: str  # export dir (fgcmr export)
    shards: str  # dataset dir (fgcmr shard output)
    split: str = "test"  # the split embedded
    max_shards: int = 2  # shards of it read at most
    batch_size: int = 64  # images per forward
    repeats: int = 5  # paired rounds, sides alternating; the ratio is the median of the rounds' ratios
    json: bool = False  # print one JSON object instead of the table
    threads: int | None = None  # torch CPU threads (default: all cores)


def run(cfg: BenchEmbedConfig) -> dict:
    d = init(cfg.threads)
    from fgcmr.model import load_export

    model, _, inputs = load_export(cfg.export, device=d.device)
    parts = plan(open_dataset(cfg.shards), [cfg.split])[: cfg.max_shards]
    export_sha = sha256_file(Path(cfg.export) / "model.safetensors")
    batches = [b for b in read_batches(parts, inputs, cfg.batch_size, d.device) if isinstance(b, Batch)]
    samples = sum(len(b.samples) for b in batches)
    prepared = [_on_device(b, inputs, d.device) for b in batches]

    @torch.inference_mode()
    def bare() -> None:
        for images, texts in prepared:
            model.encode_image(images).float().cpu()
            model.encode_text(texts).float().cpu()
        sync(d.device)

    with tempfile.TemporaryDirectory() as tmp:

        def embed() -> None:
            done = embed_parts(parts, model, inputs, d.device, cfg.batch_size, EmbedConfig.prefetch_batches)
            write_parts(Path(tmp), done, export_sha, EmbedConfig.dtype)
            sync(d.device)

        bare()  # warm-up: allocator, kernels, thread pool
        times = {"embed": [], "bare": []}
        for _ in range(cfg.repeats):
            for name, fn in (("bare", bare), ("embed", embed)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    result = {
        "samples": samples,
        "batches": len(prepared),
        "batch_size": cfg.batch_size,
        "device": d.device.type,
        "threads": torch.get_num_threads(),
        "embed_samples_per_s": samples / min(times["embed"]),
        "bare_samples_per_s": samples / min(times["bare"]),
        "round_ratios": [round(b / e, 4) for b, e in zip(times["bare"], times["embed"])],
    }
    result["ratio"] = float(statistics.median(result["round_ratios"]))
    if cfg.json:
        print(json.dumps(result))
    else:
        print(
            f"fgcmr embed : {result['embed_samples_per_s']:10.1f} samples/s\n"
            f"bare forward: {result['bare_samples_per_s']:10.1f} samples/s\n"
            f"ratio       : {result['ratio']:10.3f}  (median of {cfg.repeats} paired rounds: "
            f"{', '.join(f'{r:.3f}' for r in result['round_ratios'])})\n"
            f"              {samples} images + their captions, {len(prepared)} batches of "
            f"≤{cfg.batch_size}, {d.device.type}, {result['threads']} threads"
        )
    return result


def _on_device(batch: Batch, inputs, device: torch.device) -> tuple[torch.Tensor, object]:
    return inputs.normalize(move(batch.images, device)), move(batch.texts, device)  # batches come ``ready``
