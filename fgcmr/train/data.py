"""The training input pipeline: WebDataset shards → decoded, transformed, tokenised micro-batches.

Resampled shards (default) give every rank and worker an endless, independently seeded stream, so
ranks always see equal batch counts; without resampling shards are split by node and worker, which
needs a shard count that is a multiple of ranks × workers and at least one micro-batch per worker
(checked up front, instead of a silent spin or a hang in a collective). An epoch is an explicit
number of samples. Shards are read by ``fgcmr.dataset.iter_records``, which checks each against the
manifest as it streams (a damaged shard fails naming it, or with ``data.on_corrupt=skip`` is skipped
with a logged count), not by WebDataset's tar reader, which takes a corrupt header for the end.
Each image is paired with one of its texts, drawn at random each time.
Label sidecars (``fgcmr.labels``) are joined by key inside the workers. Images leave the workers as
uint8 pixels; the training side normalises each batch on the device (``Inputs.normalize``).

Data position on resume: the stream is reseeded from the resume step, so a resumed run continues
with fresh (not repeated) samples; the exact within-shard position is not restored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from fgcmr.config import ConfigError
from fgcmr.dataset import DatasetInfo, OnCorrupt, iter_records, sample_from_fields
from fgcmr.labels import (
    LABEL_FIELDS,
    SidecarError,
    join_labels,
    labels_dir,
    read_head_with_identity,
    read_sidecar,
    read_sidecar_identity,
    sidecar_path,
)
from fgcmr.model.inputs import Inputs
from fgcmr.train.config import DataConfig
from fgcmr.train.signals import ignore_stop_signals, kill_workers_at_exit

log = logging.getLogger("fgcmr.train")


def key_id(key: str) -> int:
    """A stable 63-bit integer id for a sample key (the relevance matrix compares image ids)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def check_sidecars(dataset: DatasetInfo, split: str, labeler: str) -> None:
    """Every data shard of the split has its sidecar, from the labeler of the head
    (keys are checked when each is read)."""
    missing = [s.name for s in dataset.shards(split) if not sidecar_path(dataset.root, labeler, s.name).is_file()]
    if missing:
        raise SidecarError(
            f"{len(missing)} of {len(dataset.shards(split))} label sidecars missing in "
            f"{labels_dir(dataset.root, labeler)} (first: {missing[0]}); "
            f"run `fgcmr label infer --shards={dataset.root}` or train with --loss.name=pairwise"
        )
    join = LabelJoin(dataset.root, labeler)
    for path in (sidecar_path(dataset.root, labeler, s.name) for s in dataset.shards(split)):
        join.check(path, read_sidecar_identity(path))


def check_shard_split(dataset: DatasetInfo, data: DataConfig, world_size: int) -> None:
    """Without resampling every worker of every rank reads its own shards (``shards[i::ranks × workers]``):
    their count must be a multiple of ranks × workers, and each worker needs at least one micro-batch."""
    split, workers, micro_batch = data.split, data.workers, data.micro_batch
    infos = dataset.shard_infos(split)
    need = world_size * max(1, workers)
    fix = "use --data.resampled=true, fewer ranks or workers, or reshard"
    if len(infos) % need:
        raise ConfigError(
            f"{dataset.root}: {len(infos)} {split} shards do not divide evenly among "
            f"{world_size} ranks × {max(1, workers)} workers without resampling "
            f"(ranks would see unequal batch counts); {fix} into a multiple of {need} shards"
        )
    fewest = min(sum(s.items for s in infos[i::need]) for i in range(need))
    if fewest < micro_batch:
        raise ConfigError(
            f"{dataset.root}: a worker's share of the {split} shards holds {fewest} samples, "
            f"less than one micro-batch of {micro_batch}, so it would never yield a batch; "
            f"{fix} into fewer, larger shards, or lower --data.micro_batch"
        )


class LabelJoin:
    """key → (text embeddings, description embedding), from the sidecar of the sample's shard, which must
    come from the same labeler as the head the loss reads (``head.npz``)."""

    def __init__(self, dataset_root: Path, labeler: str, cache_shards: int = 4):
        self.root, self.labeler, self.cache_shards = dataset_root, labeler, cache_shards
        self.identity = read_head_with_identity(dataset_root, labeler)[2]
        self._cache: dict[str, dict] = {}

    def __call__(self, shard_url: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        table = self._cache.get(shard_url)
        if table is None:
            if len(self._cache) >= self.cache_shards:
                self._cache.pop(next(iter(self._cache)))
            path = sidecar_path(self.root, self.labeler, Path(shard_url).name)
            sidecar = read_sidecar(path)
            self.check(path, sidecar.labeler)
            table = self._cache[shard_url] = sidecar.by_key()
        if key not in table:
            raise SidecarError(f"sample {key} of {shard_url} has no entry in its label sidecar")
        return table[key]

    def check(self, path: Path, identity: str) -> None:
        if identity != self.identity:
            raise SidecarError(
                f"label sidecar {path} was written by another labeler than its head.npz "
                f"({identity[:12] or 'unrecorded'} vs {self.identity[:12] or 'unrecorded'}); "
                f"rerun `fgcmr label infer --shards={self.root}` with the labeler you mean"
            )


class MakeItem:
    """One raw WebDataset record → a training item (or None: a counted, logged skip of a bad sample)."""

    def __init__(self, inputs: Inputs, labels: LabelJoin | None, seed: int):
        self.inputs, self.labels, self.seed = inputs, labels, seed
        self.rng: random.Random | None = None
        self.skipped = 0

    def __call__(self, raw: dict) -> dict | None:
        if self.rng is None:  # seeded inside the worker, distinct per rank and worker
            info = torch.utils.data.get_worker_info()
            self.rng = random.Random(f"{self.seed}:{wds.utils.pytorch_worker_seed()}:{info.id if info else 0}")
        key = raw["__key__"]
        try:
            sample = sample_from_fields(key, {k: v for k, v in raw.items() if not k.startswith("__")})
            k = self.rng.randrange(len(sample.texts))
            item = {"image": self.inputs.pixels(sample), "text": self.inputs.text(sample, k)}
        except (ValueError, OSError, KeyError) as e:  # PIL's UnidentifiedImageError is an OSError
            self.skipped += 1
            log.warning("skipped bad sample %s in %s (%d so far): %s", key, raw.get("__url__"), self.skipped, e)
            return None
        item["category"] = sample.category_id
        item["image_id"] = key_id(key)
        if self.labels is not None:
            texts, _ = self.labels(raw["__url__"], key)
            item.update(join_labels(texts, k))  # leave-one-out description of the image for its text k
        return item


class Collate:
    def __init__(self, inputs: Inputs):
        self.inputs = inputs

    def __call__(self, items: list[dict]) -> dict:
        batch = {
            "image": torch.stack([it["image"] for it in items]),
            "text": self.inputs.collate_texts([it["text"] for it in items]),
            "category": torch.tensor([it["category"] for it in items], dtype=torch.long),
            "image_id": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
        }
        for name in LABEL_FIELDS:
            if name in items[0]:
                batch[name] = torch.from_numpy(np.stack([it[name] for it in items]).astype(np.float32))
        return batch


class ShardRecords:
    """Pipeline stage: shard urls → raw WebDataset-style records, each shard checked against the manifest."""

    def __init__(self, on_corrupt: OnCorrupt = "error"):
        self.on_corrupt = on_corrupt

    def __call__(self, urls):
        for source in urls:
            url = source["url"]
            for key, fields in iter_records(url, on_corrupt=self.on_corrupt):
                yield {"__key__": key, "__url__": url, **fields}


def build_pipeline(
    urls: list[str], inputs: Inputs, data: DataConfig, batches_per_worker: int, labels: LabelJoin | None, seed: int
) -> wds.DataPipeline:
    """One worker's stream of ``data.split``'s shards ``urls``: ``batches_per_worker`` micro-batches per pass."""
    if data.resampled:
        shards = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        shards = [wds.SimpleShardList(urls, seed=seed), wds.split_by_node, wds.split_by_worker]
    return wds.DataPipeline(
        *shards,
        ShardRecords(data.on_corrupt),
        wds.shuffle(data.shuffle_buffer, initial=min(data.shuffle_buffer, 100), seed=seed),
        wds.map(MakeItem(inputs, labels, seed)),
        wds.batched(data.micro_batch, collation_fn=Collate(inputs), partial=False),
    ).with_epoch(nbatches=batches_per_worker)


def build_loader(
    dataset: DatasetInfo,
    inputs: Inputs,
    data: DataConfig,
    world_size: int,
    batches_per_rank: int,
    seed: int,
    labeler: str | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``batches_per_rank`` micro-batches per pass (rounded up to whole workers), with
    the label sidecars of ``labeler`` joined when given."""
    urls = [str(p) for p in dataset.shards(data.split)]
    if not data.resampled:
        check_shard_split(dataset, data, world_size)
    labels = None
    if labeler:
        check_sidecars(dataset, data.split, labeler)
        labels = LabelJoin(dataset.root, labeler)
    per_worker = math.ceil(batches_per_rank / max(1, data.workers))
    pipeline = build_pipeline(urls, inputs, data, per_worker, labels, seed)
    if data.workers > 0:
        kill_workers_at_exit()
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=data.workers,
        persistent_workers=data.workers > 0,
        prefetch_factor=4 if data.workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
    )
