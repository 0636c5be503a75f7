"""``fgcmr embed``: an exported model over a sharded dataset → clip-retrieval-style embedding parts.

One part per shard, numbered in the order of the selected splits' shards (manifest order)::

    <out>/img_emb/img_emb_NNNN.npy            [images, d]  one row per image
    <out>/text_emb/text_emb_NNNN.npy          [images, d]  the image's first caption (row-aligned, as clip-retrieval)
    <out>/metadata/metadata_NNNN.parquet      key, caption, url (the sample's source), split, category,
                                              category_name, shard, n_texts: one row per image
    <out>/captions/caption_emb_NNNN.npy       [texts, d]   every caption of every image
    <out>/captions/captions_NNNN.parquet      key, image_row, text_index, caption: one row per caption
    <out>/parts/part_NNNN.json                the part's record, written last: shard, its sha256, counts
    <out>/embeddings.json                     the manifest: export, dataset, dtype, dim, every part

N ranks (torchrun / srun) take the parts round-robin. Every file is written atomically; a rerun keeps
each part whose record matches the shard, the export and the dtype and whose files have the recorded
shapes, and redoes the rest. The forward loop does nothing but the forward: a reader thread reads,
decodes, transforms, tokenises and collates the next batches (and normalises them on a CPU device;
on a GPU it pins the uint8 pixels, which are normalised on the device), and a writer thread writes
each finished part, so the job keeps up with a bare forward of the same batches (``fgcmr bench embed``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
import torch

from fgcmr.config import Validated
from fgcmr import distributed
from fgcmr.dataset import DatasetInfo, Sample, iter_samples, open_dataset
from fgcmr.io import atomic_open, atomic_write_json, clean_leftovers, read_json, sha256_file
from fgcmr.progress import Progress

if TYPE_CHECKING:  # the model (and transformers) load only when embedding, not for search and index
    from fgcmr.model import TwoTower
    from fgcmr.model.inputs import Batch, Inputs

log = logging.getLogger("fgcmr.embed")
MANIFEST = "embeddings.json"


@dataclasses.dataclass
class EmbedConfig(Validated):
    export: str  # export dir (fgcmr export)
    shards: str  # dataset dir (fgcmr shard)
    out: str  # output dir
    splits: list[str] = dataclasses.field(default_factory=list)  # default: every split of the dataset
    batch_size: int = 64  # images per forward (texts: all their captions)
    dtype: Literal["float16", "float32"] = "float16"  # of the stored embeddings (clip-retrieval's default: float16)
    prefetch_batches: int = 4  # batches the reader thread prepares ahead of the towers
    threads: int | None = None  # torch CPU threads per rank (default: cores / local ranks)

    def validate(self) -> None:
        if self.batch_size < 1 or self.prefetch_batches < 1:
            raise ValueError("batch_size and prefetch_batches must be ≥ 1")


PART_FILES = {  # a part's files by kind, from its index
    "img": "img_emb/img_emb_{:04d}.npy",
    "text": "text_emb/text_emb_{:04d}.npy",
    "meta": "metadata/metadata_{:04d}.parquet",
    "caption": "captions/caption_emb_{:04d}.npy",
    "captions": "captions/captions_{:04d}.parquet",
    "record": "parts/part_{:04d}.json",
}


@dataclasses.dataclass(frozen=True)
class Part:
    index: int
    split: str
    shard: Path
    sha256: str
    items: int

    def name(self, kind: str) -> str:
        return PART_FILES[kind].format(self.index)


def plan(dataset: DatasetInfo, splits: list[str]) -> list[Part]:
    """Every selected shard as a numbered part, in split then shard order."""
    parts = []
    for split in splits or dataset.split_names:
        for info in dataset.shard_infos(split):
            parts.append(Part(len(parts), split, dataset.root / info.file, info.sha256, info.items))
    return parts


def run(cfg: EmbedConfig) -> dict | None:
    env = distributed.init(cfg.threads)
    from fgcmr.model import load_export

    out, dataset = Path(cfg.out), open_dataset(cfg.shards)
    parts = plan(dataset, cfg.splits)
    export_sha = sha256_file(Path(cfg.export) / "model.safetensors")
    model, model_cfg, inputs = load_export(cfg.export, device=env.device)
    started, mine = time.time(), distributed.shard_slice(parts, env.rank, env.world_size)
    todo = [p for p in mine if not _kept(out, p, export_sha, cfg.dtype)]
    for path in (out / p.name(kind) for p in todo for kind in PART_FILES):  # left by a write killed before its rename
        clean_leftovers(path.parent, name=path.name)  # of these parts only: other ranks write the others
    log.info("embed rank %d: %d parts, %d kept, %d to embed", env.rank, len(mine), len(mine) - len(todo), len(todo))
    with Progress(sum(p.items for p in todo), f"embed rank{env.rank}", "samples", enabled=env.is_main) as progress:
        parts_done = embed_parts(todo, model, inputs, env.device, cfg.batch_size, cfg.prefetch_batches, progress)
        write_parts(out, parts_done, export_sha, cfg.dtype)
    distributed.barrier()
    if not env.is_main:
        return None
    manifest = {
        "format": "fgcmr-embeddings",
        "dtype": cfg.dtype,
        "dim": model_cfg.embed_dim,
        "export": str(Path(cfg.export).resolve()),
        "export_sha256": export_sha,
        "dataset": {
            "root": str(dataset.root.resolve()),
            "name": dataset.name,
            "manifest_sha256": sha256_file(dataset.root / "manifest.json"),
        },
        "splits": sorted({p.split for p in parts}, key=[p.split for p in parts].index),
        "parts": [read_json(out / p.name("record")) for p in parts],
        "world_size": env.world_size,
        "seconds": round(time.time() - started, 2),
    }
    manifest["images"] = sum(r["images"] for r in manifest["parts"])
    manifest["texts"] = sum(r["texts"] for r in manifest["parts"])
    clean_leftovers(out, name=MANIFEST)
    atomic_write_json(out / MANIFEST, manifest)
    log.info("embedded %d images, %d texts in %d parts → %s", manifest["images"], manifest["texts"], len(parts), out)
    return manifest


def _kept(out: Path, part: Part, export_sha: str, dtype: str) -> bool:
    """A part already written for this shard, export and dtype, with files of the recorded shapes."""
    path = out / part.name("record")
    if not path.is_file():
        return False
    try:
        rec = read_json(path)
        ok = (
            rec["shard"] == part.shard.name
            and rec["shard_sha256"] == part.sha256
            and rec["export_sha256"] == export_sha
            and rec["dtype"] == dtype
        )
        shapes = [np.load(out / part.name(k), mmap_mode="r").shape[0] for k in ("img", "text", "caption")]
        ok = (
            ok
            and shapes == [rec["images"], rec["images"], rec["texts"]]
            and _rows(out / part.name("meta")) == rec["images"]
        )
        ok = ok and _rows(out / part.name("captions")) == rec["texts"]
    except (OSError, ValueError, KeyError) as e:
        log.warning("part %04d: record or files unreadable (%s); embedding it again", part.index, e)
        return False
    if not ok:
        log.warning(
            "part %04d: written for another shard, export or dtype, or incomplete; embedding it again", part.index
        )
    return ok


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


@dataclasses.dataclass
class PartEnd:
    part: Part
    skipped: int


def read_batches(parts: list[Part], inputs: Inputs, batch_size: int, device: torch.device) -> Iterator[Batch | PartEnd]:
    """Batches of each part in order, ``ready`` for the towers on ``device`` (so the forward loop only runs the
    towers), a ``PartEnd`` after each; bad samples skipped and counted."""
    from fgcmr.model.inputs import Batch

    for part in parts:
        items, skipped = [], 0
        for sample in iter_samples(part.shard):
            try:
                items.append(inputs.item(sample))
            except Exception as e:  # a bad sample is counted and logged, never fatal
                log.warning("skipping sample %s in %s: %s", sample.key, part.shard.name, e)
                skipped += 1
                continue
            if len(items) == batch_size:
                yield Batch.of(items).ready(inputs, device)
                items = []
        if items:
            yield Batch.of(items).ready(inputs, device)
        yield PartEnd(part, skipped)


def prefetch(it: Iterator, depth: int) -> Iterator:
    """Run ``it`` on a helper thread, ``depth`` items ahead (decoding and tokenising release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, failure = object(), []

    def work() -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # handed to the consumer, never lost in the thread
            failure.append(e)
        q.put(done)

    threading.Thread(target=work, daemon=True, name="embed-reader").start()
    while (item := q.get()) is not done:
        yield item
    if failure:
        raise failure[0]


def embed_parts(
    parts: list[Part],
    model: TwoTower,
    inputs: Inputs,
    device: torch.device,
    batch_size: int,
    depth: int,
    progress: Progress | None = None,
) -> Iterator[tuple[Part, dict]]:
    """``(part, data)`` for each part: its embeddings (fp32 numpy), samples and skip count."""
    from fgcmr.model.inputs import embed_batch

    data = _empty()
    for item in prefetch(read_batches(parts, inputs, batch_size, device), depth):
        if isinstance(item, PartEnd):
            data["skipped"] = item.skipped
            yield item.part, data
            data = _empty()
            continue
        with torch.inference_mode():
            img, txt = embed_batch(model, inputs, item, device)
        data["img"].append(img.cpu().numpy())
        data["txt"].append(txt.cpu().numpy())
        data["samples"].extend(item.samples)
        data["n_texts"].extend(item.n_texts)
        if progress is not None:
            progress.update(len(item.samples))


def write_parts(out: Path, parts: Iterator[tuple[Part, dict]], export_sha: str, dtype: str) -> None:
    """``write_part`` each finished part on a writer thread while the next one is embedded (at most one
    part waits to be written); a write's error is raised here, after the part before it was written."""
    pending: concurrent.futures.Future | None = None
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed-writer") as writer:
        for part, data in parts:
            if pending is not None:
                pending.result()
            pending = writer.submit(write_part, out, part, data, export_sha, dtype)
        if pending is not None:
            pending.result()


def _empty() -> dict:
    return {"img": [], "txt": [], "samples": [], "n_texts": [], "skipped": 0}


def write_part(out: Path, part: Part, data: dict, export_sha: str, dtype: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples, n_texts = data["samples"], np.array(data["n_texts"], dtype=np.int64)
    dim = data["img"][0].shape[1] if data["img"] else 0
    img = np.concatenate(data["img"]).astype(dtype) if samples else np.zeros((0, dim), dtype)
    txt = np.concatenate(data["txt"]).astype(dtype) if samples else np.zeros((0, dim), dtype)
    first = np.concatenate([[0], np.cumsum(n_texts)[:-1]]).astype(np.int64) if samples else np.zeros(0, np.int64)
    meta = pa.table(
        {
            "key": [s.key for s in samples],
            "caption": [s.texts[0] if s.texts else "" for s in samples],
            "url": [s.meta.get("source") for s in samples],
            "split": [s.meta.get("split", part.split) for s in samples],
            "category": pa.array([s.category for s in samples], pa.int64()),
            "category_name": [s.meta.get("category_name") for s in samples],
            "shard": [part.shard.name] * len(samples),
            "n_texts": n_texts,
        }
    )
    owner = np.repeat(np.arange(len(samples)), n_texts)
    captions = pa.table(
        {
            "key": [samples[i].key for i in owner],
            "image_row": owner,
            "text_index": (np.arange(len(owner)) - np.repeat(first, n_texts)).astype(np.int64),
            "caption": [
                caption(samples[i], k) for i, k in zip(owner, np.arange(len(owner)) - np.repeat(first, n_texts))
            ],
        }
    )
    for kind, array in (("img", img), ("text", txt[first] if samples else txt), ("caption", txt)):
        with atomic_open(out / part.name(kind)) as f:
            np.save(f, array, allow_pickle=False)
    for kind, table in (("meta", meta), ("captions", captions)):
        with atomic_open(out / part.name(kind)) as f:
            pq.write_table(table, f)
    atomic_write_json(
        out / part.name("record"),
        {
            "part": part.index,
            "split": part.split,
            "shard": part.shard.name,
            "shard_sha256": part.sha256,
            "export_sha256": export_sha,
            "dtype": dtype,
            "images": len(samples),
            "texts": int(n_texts.sum()),
            "skipped": data["skipped"],
            "files": {k: part.name(k) for k in ("img", "text", "meta", "caption", "captions")},
        },
    )


def caption(sample: Sample, k: int) -> str:
    """The text of a sample's k-th text embedding (its first text for the rows of a ``txt.npy`` feature)."""
    return sample.texts[k] if k < len(sample.texts) else (sample.texts[0] if sample.texts else "")


@dataclasses.dataclass
class Embeddings:
    """An embed output read back (selected splits, part order): what ``index`` and ``eval`` consume."""

    manifest: dict
    img: np.ndarray  # [images, d] fp32
    captions: np.ndarray  # [texts, d] fp32
    meta: "pyarrow.Table"  # noqa: F821 - one row per image
    caption_meta: "pyarrow.Table"  # noqa: F821 - one row per caption; image_row indexes img / meta

    @property
    def caption_owner(self) -> np.ndarray:
        return self.caption_meta.column("image_row").to_numpy()


def read_embeddings(root: str | Path, splits: list[str] | None = None) -> Embeddings:
    """The parts of ``splits`` (default: all) concatenated, caption owners re-indexed to the concatenation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"{root} is not an fgcmr embed output (no {MANIFEST}); run `fgcmr embed`")
    manifest = read_json(root / MANIFEST)
    records = [r for r in manifest["parts"] if not splits or r["split"] in splits]
    missing = sorted(set(splits or ()) - {r["split"] for r in manifest["parts"]})
    if missing:
        raise FileNotFoundError(
            f"{root}: no embeddings of split {missing[0]!r}; embedded: {', '.join(manifest['splits'])}"
        )
    img, cap, meta, caps, offset = [], [], [], [], 0
    for r in records:
        img.append(np.load(root / r["files"]["img"]).astype(np.float32))
        cap.append(np.load(root / r["files"]["caption"]).astype(np.float32))
        meta.append(pq.read_table(root / r["files"]["meta"]))
        t = pq.read_table(root / r["files"]["captions"])
        caps.append(
            t.set_column(
                t.schema.get_field_index("image_row"),
                "image_row",
                pa.array(t.column("image_row").to_numpy() + offset, pa.int64()),
            )
        )
        offset += r["images"]
    dim = int(manifest["dim"])
    return Embeddings(
        manifest=manifest,
        img=np.concatenate(img) if img else np.zeros((0, dim), np.float32),
        captions=np.concatenate(cap) if cap else np.zeros((0, dim), np.float32),
        meta=pa.concat_tables(meta) if meta else None,
        caption_meta=pa.concat_tables(caps) if caps else None,
    )
