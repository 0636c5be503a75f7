"""``fgcmr eval``: embed a split with the exported model on N ranks, score it, draw the report.

Each rank embeds its round-robin share of the split's shards (``fgcmr.dataset.iter_samples``, so
every sample exactly once); rank 0 gathers the per-shard results, restores shard order and writes

    <run>/eval/metrics.json     metrics of ``split`` at top level, every split under ``splits``,
                                classical baselines (optional), data and model provenance by content
                                (sha256, names), so identical runs give byte-identical files
    <run>/eval/run_info.json    where and when: dataset and export paths, embedding time, finish time
    <run>/eval/report.png       PR curves, similarity histograms, top-5 images for a few text queries
    <run>/eval/config.yaml      this job's resolved config
    <run>/eval/tensorboard/     the same numbers as scalars ``eval/<split>/<metric>``
    <run>/eval/fgcmr-stage.json its fingerprint (config, exported weights, dataset), written last: ``done``

The dataset comes from the run's ``config.yaml`` (``train.shards``) unless ``--shards`` is given.
``--embeddings=<fgcmr embed output>`` scores embeddings already computed by ``fgcmr embed`` with the
same export on the same dataset (checked by hash) instead of embedding the splits again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fgcmr import distributed
from fgcmr.config import dump_yaml, read_yaml
from fgcmr.dataset import DatasetInfo, iter_samples, open_dataset
from fgcmr.evaluate.metrics import RECALL_KS, retrieval_metrics
from fgcmr.io import atomic_write_json, atomic_write_text, clean_leftovers, sha256_file
from fgcmr.progress import Progress
from fgcmr.evaluate.config import EvalConfig, eval_fingerprint, eval_paths, run_shards
from fgcmr.run import STAMP, write_stamp
from fgcmr.retrieval.embed import EmbedConfig, caption, embed_parts, plan

if TYPE_CHECKING:
    from fgcmr.model import Inputs, TwoTower

log = logging.getLogger("fgcmr.eval")


@dataclasses.dataclass
class Embedded:
    """One split in shard order: image/text embeddings, categories, text owners, texts, raw features."""

    keys: list[str]
    img_emb: np.ndarray
    txt_emb: np.ndarray
    img_cat: np.ndarray
    txt_owner: np.ndarray
    texts: list[str]
    img_feat: np.ndarray | None
    txt_feat: np.ndarray | None
    skipped: int


def run(cfg: EvalConfig) -> dict | None:
    env = distributed.init()
    from fgcmr.model import load_export

    run_dir, export_dir, out = eval_paths(cfg)
    dataset = open_dataset(cfg.shards or run_shards(run_dir))
    fp = eval_fingerprint(cfg) if env.is_main else None
    if env.is_main:
        (out / STAMP).unlink(missing_ok=True)  # the old results stop counting as done from here on
        clean_leftovers(out)
    model, _, inputs = (None, None, None) if cfg.embeddings else load_export(export_dir, device=env.device)
    started = time.time()
    results = {}
    for split in [cfg.split, *[s for s in cfg.extra_splits if s != cfg.split]]:
        if cfg.embeddings:
            emb = reuse_embeddings(cfg.embeddings, split, export_dir, dataset) if env.is_main else None
        else:
            emb = embed_split(dataset, split, model, inputs, env, cfg.batch_size, keep_features=cfg.baselines)
        if env.is_main:
            results[split] = emb
    distributed.barrier()
    if not env.is_main:
        return None
    metrics = summarise(cfg, dataset, export_dir, run_dir, results, env.world_size)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    atomic_write_json(
        out / "run_info.json",
        {
            "shards": str(dataset.root),
            "export": str(export_dir),
            "embed_seconds": round(time.time() - started, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    atomic_write_json(out / "metrics.json", metrics)
    if cfg.tensorboard:
        _log_tensorboard(out / "tensorboard", metrics, _train_steps(run_dir))
    if cfg.report:
        _draw(out / "report.png", dataset, cfg, results[cfg.split], metrics, run_dir)
    write_stamp(out, fp)
    log.info("%s", format_table(metrics))
    log.info("wrote %s", out / "metrics.json")
    return metrics


@torch.no_grad()
def embed_split(
    dataset: DatasetInfo,
    split: str,
    model: TwoTower,
    inputs: Inputs,
    env: distributed.DistEnv,
    batch_size: int,
    keep_features: bool,
) -> Embedded | None:
    """Embed this rank's shards of ``split`` (``fgcmr embed``'s reader and forward); rank 0 returns the whole
    split in shard order."""
    mine = distributed.shard_slice(plan(dataset, [split]), env.rank, env.world_size)
    parts = []
    with Progress(
        sum(p.items for p in mine), f"eval {split} rank{env.rank}", "samples", enabled=env.is_main
    ) as progress:
        for part, data in embed_parts(
            mine, model, inputs, env.device, batch_size, EmbedConfig.prefetch_batches, progress
        ):
            parts.append((part.index, _part(data, keep_features)))
    gathered = [p for rank_parts in distributed.all_gather_objects(parts) for p in rank_parts]
    if not env.is_main:
        return None
    return _concat([part for _, part in sorted(gathered, key=lambda p: p[0])])


def reuse_embeddings(root: str, split: str, export_dir: Path, dataset: DatasetInfo) -> Embedded:
    """One split of an ``fgcmr embed`` output as ``Embedded``, refused unless made by this export on this dataset."""
    from fgcmr.config import ConfigError
    from fgcmr.retrieval.embed import read_embeddings

    emb = read_embeddings(root, [split])
    if emb.manifest["export_sha256"] != sha256_file(export_dir / "model.safetensors"):
        raise ConfigError(
            f"{root} was embedded with another model than {export_dir}; run `fgcmr embed` with it or drop --embeddings"
        )
    if emb.manifest["dataset"]["manifest_sha256"] != sha256_file(dataset.root / "manifest.json"):
        raise ConfigError(
            f"{root} was embedded from another dataset than {dataset.root}; drop --embeddings or pass its --shards"
        )
    return Embedded(
        keys=emb.meta.column("key").to_pylist(),
        img_emb=emb.img,
        txt_emb=emb.captions,
        img_cat=np.array([-1 if c is None else c for c in emb.meta.column("category").to_pylist()], dtype=np.int64),
        txt_owner=emb.caption_owner.astype(np.int64),
        texts=emb.caption_meta.column("caption").to_pylist(),
        img_feat=None,
        txt_feat=None,
        skipped=sum(r["skipped"] for r in emb.manifest["parts"] if r["split"] == split),
    )


def _part(data: dict, keep_features: bool) -> dict:
    """One shard's ``embed_parts`` output as the pieces ``_concat`` joins (texts for the report, raw features
    for the baselines)."""
    samples = data["samples"]

    def features(name: str) -> list[np.ndarray | None]:
        if not keep_features:
            return []
        values = (getattr(s, name) for s in samples)
        return [None if f is None else np.asarray(f, np.float32).reshape(-1) for f in values]

    return {
        "keys": [s.key for s in samples],
        "img": data["img"],
        "txt": data["txt"],
        "cat": [s.category_id for s in samples],
        "n_texts": data["n_texts"],
        "texts": [caption(s, k) for s, n in zip(samples, data["n_texts"]) for k in range(n)],
        "img_feat": features("image_feature"),
        "txt_feat": features("text_feature"),
        "skipped": data["skipped"],
    }


def _concat(parts: list[dict]) -> Embedded:
    n_texts = np.array([n for p in parts for n in p["n_texts"]], dtype=np.int64)
    img_feat = [f for p in parts for f in p["img_feat"]]
    txt_feat = [f for p in parts for f in p["txt_feat"]]
    return Embedded(
        keys=[k for p in parts for k in p["keys"]],
        img_emb=np.concatenate([a for p in parts for a in p["img"]]) if n_texts.size else np.zeros((0, 1), np.float32),
        txt_emb=np.concatenate([a for p in parts for a in p["txt"]]) if n_texts.size else np.zeros((0, 1), np.float32),
        img_cat=np.array([c for p in parts for c in p["cat"]], dtype=np.int64),
        txt_owner=np.repeat(np.arange(len(n_texts)), n_texts),
        texts=[t for p in parts for t in p["texts"]],
        img_feat=np.stack(img_feat) if img_feat and all(f is not None for f in img_feat) else None,
        txt_feat=np.stack(txt_feat) if txt_feat and all(f is not None for f in txt_feat) else None,
        skipped=sum(p["skipped"] for p in parts),
    )


def summarise(
    cfg: EvalConfig,
    dataset: DatasetInfo,
    export_dir: Path,
    run_dir: Path,
    results: dict[str, Embedded],
    world_size: int,
) -> dict:
    """metrics.json: the main split's metrics at top level, every split, baselines, provenance by content
    (no paths or times: those go to run_info.json, so identical runs in two places agree byte for byte)."""
    splits = {}
    for split, emb in results.items():
        if len(emb.keys) == 0:
            raise ValueError(f"split {split!r} of {dataset.root} has no usable sample ({emb.skipped} skipped)")
        m = retrieval_metrics(emb.img_emb, emb.txt_emb, emb.img_cat, emb.txt_owner)
        m.update(images=len(emb.keys), texts=len(emb.txt_owner), skipped_samples=emb.skipped)
        splits[split] = m
    metrics = {**splits[cfg.split], "split": cfg.split}
    if cfg.baselines:
        from fgcmr.evaluate.run_baselines import baseline_metrics

        metrics["baselines"] = baseline_metrics(dataset, cfg, results[cfg.split])
    metrics["splits"] = {s: {k: v for k, v in m.items() if not k.startswith("pr_")} for s, m in splits.items()}
    metrics["data"] = {
        "name": dataset.name,
        "manifest_sha256": sha256_file(dataset.root / "manifest.json"),
    }
    train_cfg = _train_config(run_dir)
    from fgcmr.model.export import weights_sha256

    metrics["model"] = {
        "weights_sha256": weights_sha256(export_dir / "model.safetensors"),
        "loss": train_cfg.get("loss"),
        "seed": train_cfg.get("seed"),
        "labels": train_cfg.get("labels"),
    }
    metrics["eval"] = {"world_size": world_size}
    return metrics


def _train_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return (read_yaml(path).get("train") or {}) if path.is_file() else {}


def _train_steps(run_dir: Path) -> int:
    path = run_dir / "config.yaml"
    return int(((read_yaml(path).get("schedule") or {}).get("total_steps")) or 0) if path.is_file() else 0


SCALARS = (
    "map_i2t",
    "map_t2i",
    "map_avg",
    "mapr_i2t",
    "mapr_t2i",
    *(f"r{k}_{d}" for k in RECALL_KS for d in ("i2t", "t2i")),
    "medr_i2t",
    "medr_t2i",
    "chance_map",
)


EVENTS_SUFFIX = ".fgcmr-eval"


def _log_tensorboard(logdir: Path, metrics: dict, step: int) -> None:
    """The scalars of this eval only: a redone or killed eval's events file goes, so no scalar shows twice
    (only eval's own files, marked by their suffix: ``--out`` may share a folder with other writers)."""
    from torch.utils.tensorboard import SummaryWriter

    for old in logdir.glob(f"events.out.tfevents.*{EVENTS_SUFFIX}"):
        old.unlink()
    with SummaryWriter(str(logdir), filename_suffix=EVENTS_SUFFIX) as writer:
        for split, m in metrics["splits"].items():
            for key in SCALARS:
                writer.add_scalar(f"eval/{split}/{key}", m[key], step)
        for name, m in scored_baselines(metrics).items():
            for key in ("map_i2t", "map_t2i", "map_avg"):
                writer.add_scalar(f"baseline/{name}/{key}", m[key], step)


def scored_baselines(metrics: dict) -> dict[str, dict]:
    """The baselines that were computed (not skipped)."""
    return {k: v for k, v in (metrics.get("baselines") or {}).items() if isinstance(v, dict) and "map_avg" in v}


def format_table(metrics: dict) -> str:
    """The final table people read: MAP@all, MAP@R, R@K, median rank per direction, and chance."""
    rows = [f"{'':6} {'MAP@all':>8} {'MAP@R':>7} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'medR':>6}"]
    for d, name in (("i2t", "i→t"), ("t2i", "t→i")):
        rows.append(
            f"{name:6} {metrics[f'map_{d}']:8.4f} {metrics[f'mapr_{d}']:7.4f} "
            + " ".join(f"{metrics[f'r{k}_{d}']:6.3f}" for k in RECALL_KS)
            + f" {metrics[f'medr_{d}']:6.0f}"
        )
    rows.append(
        f"{'avg':6} {metrics['map_avg']:8.4f}   (chance MAP@all {metrics['chance_map']:.4f}; "
        f"{metrics.get('images', '?')} images, {metrics.get('texts', '?')} texts)"
    )
    for name, b in scored_baselines(metrics).items():
        rows.append(f"{name:6.6} {b['map_i2t']:8.4f} / {b['map_t2i']:.4f}  avg {b['map_avg']:.4f}  (baseline {name})")
    return "\n" + "\n".join(rows)


def _draw(path: Path, dataset: DatasetInfo, cfg: EvalConfig, emb: Embedded, metrics: dict, run_dir: Path) -> None:
    from fgcmr.evaluate.report import draw_report, pick_text_queries, top_images

    has_pixels = emb.img_feat is None and _split_has_pixels(dataset, cfg.split)
    loader = None
    if has_pixels:
        wanted = {
            int(i)
            for i in top_images(emb.img_emb, emb.txt_emb, pick_text_queries(emb.txt_owner, cfg.report_queries)).ravel()
        }
        images = _read_images(dataset, cfg.split, {emb.keys[i] for i in wanted})
        loader = lambda i: images.get(emb.keys[i])  # noqa: E731
    title = f"{'/'.join(run_dir.resolve().parts[-2:])} on {dataset.name}/{cfg.split}"
    draw_report(path, metrics, emb, loader, title, cfg.report_queries)


def _split_has_pixels(dataset: DatasetInfo, split: str) -> bool:
    shards = dataset.shards(split)
    return bool(shards) and next(iter_samples(shards[0])).image is not None


def _read_images(dataset: DatasetInfo, split: str, keys: set[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for path in dataset.shards(split):
        for sample in iter_samples(path):
            if sample.key in keys and sample.image is not None:
                found[sample.key] = sample.image
        if len(found) == len(keys):
            break
    return found
