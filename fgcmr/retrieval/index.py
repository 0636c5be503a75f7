"""``fgcmr index``: faiss indexes over an embed output, with their metadata and their measured quality.

Two indexes, one per search direction: ``images.faiss`` (image embeddings, searched by text queries)
and ``captions.faiss`` (every caption, searched by image queries), each with a parquet of its rows'
metadata in index order, and ``index.json`` (what was built, from what, and how well it does).

Below ``exact_below`` vectors the index is exact (``IndexFlatIP``: inner product = cosine on unit
vectors). Above, it is ``IVF<nlist>,Flat``: ``nlist`` ≈ ``4·√n`` (a power of two), k-means trained on
a sample of ``train_per_list × nlist`` vectors, and ``nprobe`` doubled until recall@10 against exact
search reaches ``target_recall`` on held-out queries (the other modality's embeddings) — the figure
``index.json`` reports, with the index's bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np

from fgcmr.config import Validated
from fgcmr.io import atomic_open, atomic_write_json

log = logging.getLogger("fgcmr.index")
RECALL_K = 10


@dataclasses.dataclass(kw_only=True)
class IndexParams(Validated):
    """How an index is built over a set of vectors: by ``fgcmr index`` and, on synthetic ones, ``fgcmr bench index``."""

    exact_below: int = 50_000  # vectors; an exact IndexFlatIP below, IVF above
    target_recall: float = 0.95  # recall@10 vs exact search that nprobe is raised to reach
    train_per_list: int = 64  # k-means training vectors per inverted list
    seed: int = 0  # seed of the k-means training sample and the held-out queries

    def validate(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise ValueError("target_recall must be in (0, 1]")


@dataclasses.dataclass(kw_only=True)
class IndexConfig(IndexParams):
    embeddings: str  # fgcmr embed output dir
    out: str  # index dir
    splits: list[str] = dataclasses.field(default_factory=list)  # default: every embedded split
    queries: int = 1000  # held-out queries for the recall measurement
    threads: int | None = None  # faiss OpenMP threads (default: all cores)


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``2·√n``, at least 16 (2048 at 1M)."""
    return max(16, 2 ** round(math.log2(2 * math.sqrt(max(n, 1)))))


def build_index(vectors: np.ndarray, queries: np.ndarray, params: IndexParams):
    """The index over ``vectors`` (unit rows, fp32) and its report: kind, factory, nprobe, recall@10, bytes, seconds."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    t0 = time.perf_counter()
    if n < params.exact_below:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        report = {"kind": "exact", "factory": "Flat", "nprobe": None, "recall_at_10": 1.0}
    else:
        nlist = nlist_for(n)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(params.seed)
        sample = vectors[np.sort(rng.choice(n, size=min(n, params.train_per_list * nlist), replace=False))]
        index.train(sample)
        index.add(vectors)
        trained = time.perf_counter() - t0
        nprobe, recall = tune_nprobe(index, vectors, queries, nlist, params.target_recall)
        report = {
            "kind": "ivf",
            "factory": f"IVF{nlist},Flat",
            "nlist": nlist,
            "nprobe": nprobe,
            "recall_at_10": recall,
            "train_vectors": len(sample),
            "build_seconds_before_tuning": round(trained, 2),
        }
    report.update(
        vectors=n,
        dim=dim,
        queries=len(queries),
        bytes=index_bytes(index),
        build_seconds=round(time.perf_counter() - t0, 2),
    )
    return index, report


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """The exact top-k by inner product (brute force, no copy of the vectors)."""
    import faiss

    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k among the index's top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)])) if len(truth) else 1.0


def tune_nprobe(index, vectors: np.ndarray, queries: np.ndarray, nlist: int, target: float) -> tuple[int, float]:
    """The smallest power-of-two ``nprobe`` reaching ``target`` recall@10 on ``queries`` (or all lists)."""
    truth = exact_top(vectors, queries)
    nprobe = 1
    while True:
        index.nprobe = nprobe
        recall = recall_at(index.search(np.ascontiguousarray(queries, dtype=np.float32), RECALL_K)[1], truth)
        log.info("nprobe %d: recall@%d %.4f", nprobe, RECALL_K, recall)
        if recall >= target or nprobe >= nlist:
            return nprobe, recall
        nprobe = min(nlist, nprobe * 2)


def index_bytes(index) -> int:
    """What the index holds in memory, ≈ its serialised size (vectors, lists, centroids)."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def held_out(queries: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return queries[np.sort(rng.choice(len(queries), size=min(count, len(queries)), replace=False))]


def run(cfg: IndexConfig) -> dict:
    import faiss
    import pyarrow.parquet as pq

    from fgcmr.retrieval.embed import read_embeddings

    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    emb = read_embeddings(cfg.embeddings, cfg.splits or None)
    if len(emb.img) == 0:
        raise FileNotFoundError(f"{cfg.embeddings}: no embedded images in splits {cfg.splits or 'all'}")
    out = Path(cfg.out)
    reports = {}
    for name, vectors, queries, table in (
        ("images", emb.img, emb.captions, emb.meta),
        ("captions", emb.captions, emb.img, emb.caption_meta),
    ):
        index, report = build_index(vectors, held_out(queries, cfg.queries, cfg.seed), cfg)
        with atomic_open(out / f"{name}.faiss") as f:
            f.write(faiss.serialize_index(index).tobytes())
        with atomic_open(out / f"{name}.parquet") as f:
            pq.write_table(table, f)
        reports[name] = report
        log.info(
            "%s: %s over %d vectors (dim %d), recall@10 %.4f vs exact, %.1f MiB",
            name,
            report["factory"],
            report["vectors"],
            report["dim"],
            report["recall_at_10"],
            report["bytes"] / 2**20,
        )
    info = {
        "format": "fgcmr-index",
        "embeddings": str(Path(cfg.embeddings).resolve()),
        "export": emb.manifest["export"],
        "export_sha256": emb.manifest["export_sha256"],
        "dataset": emb.manifest["dataset"],
        "splits": cfg.splits or emb.manifest["splits"],
        "indexes": reports,
    }
    atomic_write_json(out / "index.json", info)
    for name, r in reports.items():
        print(
            f"{name:9} {r['factory']:>14}  {r['vectors']:>9} vectors  recall@10 {r['recall_at_10']:.4f}  "
            f"{r['bytes'] / 2**20:8.1f} MiB  {r['build_seconds']:.1f}s"
        )
    return info
