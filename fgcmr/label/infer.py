"""``fgcmr label infer``: write one label sidecar per data shard, on N ranks.

Each rank takes a round-robin share of the shards of every split. A shard whose sidecar exists and
matches the shard's keys is kept, so a killed job rerun with the same command finishes the rest and
ends with exactly the output of an uninterrupted run. Each sidecar carries the labeler's identity
(``fgcmr.labels.labeler_identity``): one written by another labeler (or before retraining) is redone.
Embeddings depend only on the shard (texts are batched by length within windows of a shard, read and
tokenised on a helper thread while the encoder runs: ``fgcmr.label.stream``), so 1 rank and N ranks
write the same files. Rank 0 then writes
``head.npz``, ``manifest.json`` (labeler, metrics, counts, per-sidecar sha256), the resolved config,
and TensorBoard histograms of ``p`` on relevant vs irrelevant image-text pairs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fgcmr.config import dump_yaml
from fgcmr.dataset import open_dataset
from fgcmr.distributed import DistEnv, all_gather_objects, barrier, init, shard_slice
from fgcmr.io import atomic_write_json, atomic_write_text, read_json, sha256_file
from fgcmr.label.config import LabelInferConfig, infer_fingerprint
from fgcmr.label.encode import encode_batch
from fgcmr.label.model import SiameseLabeler, load_labeler
from fgcmr.label.stream import ShardEnd, ShardTexts, TextBatch, prefetch, shard_items
from fgcmr.labels import (
    SidecarError,
    labeler_identity,
    labels_dir,
    pair_scores,
    read_head,
    read_sidecar,
    relevance,
    sidecar_path,
    verify_labels,
    write_head,
    write_sidecar,
)
from fgcmr.run import clear_stamp, write_stamp

log = logging.getLogger("fgcmr.label")


def embed_shard(
    data: ShardTexts, pieces: list[tuple[torch.Tensor, torch.Tensor]], dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text_emb, text_offsets, desc_emb) of one shard from its embedded batches (positions, embeddings);
    a description is the mean of its texts' embeddings."""
    counts = np.array([len(t) for t in data.texts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    emb = torch.empty((int(offsets[-1]), dim), dtype=torch.float32)
    for rows, e in pieces:
        emb[rows] = e
    owner = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    desc = (
        torch.zeros((len(counts), emb.shape[1])).index_add_(0, owner, emb)
        / torch.from_numpy(counts).clamp_min(1)[:, None]
    )
    return emb.numpy(), offsets, desc.numpy()


def finish_shard(
    end: ShardEnd, pieces: list[tuple[torch.Tensor, torch.Tensor]], dim: int, cfg: LabelInferConfig, identity: str
) -> dict:
    """Write an embedded shard's sidecar (unless kept); returns its manifest record, with categories for histograms."""
    data, path = end.data, sidecar_path(cfg.shards, cfg.labeler_name, end.shard.name)
    empty = sum(1 for t in data.texts if not t)
    if empty:
        log.warning("label infer: %s: %d samples without text get a zero description", end.shard.name, empty)
    if not end.kept:
        write_sidecar(path, data.keys, *embed_shard(data, pieces, dim), labeler=identity)
    return {
        "file": path.name,
        "items": len(data.keys),
        "texts": sum(len(t) for t in data.texts),
        "empty": empty,
        "status": "kept" if end.kept else "written",
        "sha256": sha256_file(path),
        "categories": data.categories,
    }


def _log_shard(d: DistEnv, name: str, record: dict, seconds: float, waited: float) -> None:
    log.info(
        "label infer rank %d/%d: %s %s: %d samples, %d texts, %.1fs (%.1f samples/s; %.1fs waiting for input)",
        d.rank,
        d.world_size,
        name,
        record["status"],
        record["items"],
        record["texts"],
        seconds,
        record["items"] / max(seconds, 1e-9),
        waited,
    )


def sidecar_check(cfg: LabelInferConfig, shard: Path, identity: str) -> Callable[[ShardTexts], bool] | None:
    """None when the shard has no sidecar yet; else a check that keeps it if it matches the shard's keys
    and was written by this labeler."""
    path = sidecar_path(cfg.shards, cfg.labeler_name, shard.name)
    if not path.is_file():
        return None

    def matches(data: ShardTexts) -> bool:
        try:
            sc = read_sidecar(path, data.keys)
        except SidecarError as e:
            log.warning("label infer: redoing %s", e)
            return False
        if sc.labeler != identity:
            log.warning(
                "label infer: redoing %s: written by another labeler (%s, now %s)",
                path,
                sc.labeler[:12] or "unrecorded",
                identity[:12],
            )
            return False
        return True

    return matches


def label_shards(
    model: SiameseLabeler,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    shards: list[Path],
    cfg: LabelInferConfig,
    d: DistEnv,
    identity: str = "",
) -> list[dict]:
    """Label shards in order while a helper thread reads and tokenises ahead, batch by batch
    (``fgcmr.label.stream``)."""
    items = (
        item
        for shard in shards
        for item in shard_items(
            shard, tokenizer, max_length, cfg.batch_size, cfg.window_batches, sidecar_check(cfg, shard, identity)
        )
    )
    records, pieces, waited = [], [], 0.0
    start = t = time.monotonic()
    with contextlib.closing(prefetch(items, cfg.prefetch_batches)) as stream:
        for item in stream:
            waited += time.monotonic() - t
            if isinstance(item, TextBatch):
                rows, batch = item.batch
                pieces.append((rows, encode_batch(model, batch, d.device, cfg.dtype)))
            else:
                records.append(finish_shard(item, pieces, model.proj.out_features, cfg, identity))
                _log_shard(d, item.shard.name, records[-1], time.monotonic() - start, waited)
                pieces, waited, start = [], 0.0, time.monotonic()
            t = time.monotonic()
    return records


def run(cfg: LabelInferConfig) -> dict:
    d = init(cfg.threads)
    ds = open_dataset(cfg.shards)
    out = labels_dir(cfg.shards, cfg.labeler_name)
    identity = labeler_identity(cfg.labeler)
    if cfg.verify_only:
        from fgcmr.verify import verify_shards

        shard_problems = [r.problem for r in verify_shards(ds) if r.problem]
        return _report(
            shard_problems,
            verify_labels(cfg.shards, cfg.labeler_name, check_keys=not shard_problems, identity=identity),
            out,
        )
    model, tokenizer, max_length = load_labeler(cfg.labeler)
    model.to(d.device)
    if d.is_main:
        clear_stamp(out)
    splits = cfg.splits or ds.split_names
    mine = [(split, shard) for split in splits for shard in shard_slice(ds.shards(split), d.rank, d.world_size)]
    t0 = time.monotonic()
    done = label_shards(model, tokenizer, max_length, [shard for _, shard in mine], cfg, d, identity)
    records = {shard.name: dict(r, split=split) for (split, shard), r in zip(mine, done)}
    mine = sum(r["items"] for r in records.values() if r["status"] == "written")
    log.info("label infer rank %d: %d samples embedded in %.1fs", d.rank, mine, time.monotonic() - t0)
    gathered = {k: v for part in all_gather_objects(records) for k, v in part.items()}
    manifest = None
    if d.is_main:
        write_head(
            cfg.shards, cfg.labeler_name, model.w.detach().float().numpy(), float(model.c.detach().float()), identity
        )
        manifest = _manifest(cfg, ds, splits, gathered, d, identity)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        atomic_write_json(out / "manifest.json", manifest)
        write_stamp(out, infer_fingerprint(cfg))
        log.info(
            "label infer: %d sidecars (%d written, %d kept) → %s",
            len(gathered),
            sum(r["status"] == "written" for r in gathered.values()),
            sum(r["status"] == "kept" for r in gathered.values()),
            out,
        )
    barrier()
    return manifest


def _manifest(cfg: LabelInferConfig, ds, splits: list[str], records: dict, d: DistEnv, identity: str) -> dict:
    metrics_path = Path(cfg.labeler) / "metrics.json"
    ordered = [r for split in splits for r in (records[s.name] for s in ds.shards(split))]
    return {
        "labeler": {"name": cfg.labeler_name, "path": str(Path(cfg.labeler).resolve()), "identity": identity},
        "metrics": read_json(metrics_path) if metrics_path.is_file() else None,
        "dataset": ds.name,
        "counts": {
            split: {
                "sidecars": sum(r["split"] == split for r in ordered),
                "items": sum(r["items"] for r in ordered if r["split"] == split),
                "texts": sum(r["texts"] for r in ordered if r["split"] == split),
                "items_without_text": sum(r["empty"] for r in ordered if r["split"] == split),
            }
            for split in splits
        },
        "pair_scores": _histograms(cfg, ds, splits, records),
        "sidecars": {Path(r["file"]).name: {k: r[k] for k in ("split", "items", "texts", "sha256")} for r in ordered},
        "world_size": d.world_size,
    }


def _histograms(cfg: LabelInferConfig, ds, splits: list[str], records: dict) -> dict:
    """``p`` of every image-text pair among the first images of each split, split by relevance (an image's
    own texts against its leave-one-out description)."""
    w, c = read_head(cfg.shards, cfg.labeler_name)
    w = torch.from_numpy(w)
    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(labels_dir(cfg.shards, cfg.labeler_name) / "tensorboard"))
    summary = {}
    for split in splits:
        desc, texts, cats, owner = [], [], [], []
        for shard in ds.shards(split):
            sc = read_sidecar(sidecar_path(cfg.shards, cfg.labeler_name, shard.name))
            for i, cat in enumerate(records[shard.name]["categories"]):
                if len(desc) >= cfg.hist_max_images:
                    break
                desc.append(sc.desc_emb[i])
                texts.append(sc.texts_of(i))
                owner += [len(desc) - 1] * len(texts[-1])
                cats.append(cat)
        if not desc:
            continue
        cat = torch.tensor(cats)
        own = torch.tensor(owner)
        t = torch.from_numpy(np.concatenate(texts)).float()
        p = pair_scores(torch.from_numpy(np.stack(desc)), t, w, c)
        # An image's own texts are scored as training scores them: against the mean of its other texts
        # (fgcmr.labels.join_labels); an image with a single text has no such pair.
        n = torch.bincount(own)[own]
        loo = (torch.zeros((len(desc), t.shape[1])).index_add_(0, own, t)[own] - t) / (n - 1).clamp_min(1)[:, None]
        cols = torch.arange(len(own))
        p[own, cols] = torch.sigmoid(((loo * w) * t).sum(1) + c)
        valid = torch.ones_like(p, dtype=torch.bool)
        valid[own, cols] = n > 1
        y = relevance(cat, cat[own], torch.arange(len(desc)), own) > 0
        summary[split] = {
            "images": len(desc),
            "texts": len(own),
            "single_text_images": int((torch.bincount(own) == 1).sum()),
        }
        for name, scores in (("positive", p[y & valid]), ("negative", p[~y])):  # a one-image split has no negatives
            summary[split][f"mean_p_{name}"] = float(scores.mean()) if scores.numel() else None
            if writer and scores.numel():
                writer.add_histogram(f"labels/{split}/p_{name}", scores, 0)
    if writer:
        writer.close()
    return summary


def _report(shard_problems: list[str], problems: list[str], out: Path) -> dict:
    for p in shard_problems + problems:
        log.error("%s", p)
    if shard_problems:
        raise SystemExit(
            f"fgcmr: {len(shard_problems)} data shard(s) damaged (not the labels): re-shard with the same "
            f"`fgcmr shard` command, then rerun `fgcmr label infer`"
        )
    if problems:
        raise SystemExit(
            f"fgcmr: {len(problems)} problem(s) with the labels in {out}; rerun `fgcmr label infer` to repair them"
        )
    log.info("label infer: every sidecar in %s is present, intact and aligned with its shard", out)
    return {"problems": []}
