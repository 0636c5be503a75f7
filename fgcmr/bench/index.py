"""``fgcmr bench index``: the ANN index at scale on synthetic embeddings: recall@10 vs exact, memory, latency.

The collection is ``vectors`` unit vectors of ``dim`` around ``clusters`` random centres (real embeddings
are clustered too; uniform noise would be a worst case no embedding model produces), the queries are
``queries`` further points of the same distribution, not in the index. The index is built exactly as
``fgcmr index`` builds it (``build_index``); latency is per single query (batch of one) on ``threads``
faiss threads, as an interactive search would run.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time

import numpy as np

from fgcmr.retrieval.index import IndexParams, build_index


@dataclasses.dataclass
class BenchIndexConfig:
    vectors: int = 1_000_000  # synthetic embeddings indexed
    dim: int = 256  # their dimension
    clusters: int = 2000  # centres the embeddings are drawn around
    noise: float = 1.0  # norm of the Gaussian offset from the (unit) centre: point–centre cosine ≈ 0.7
    queries: int = 1000  # queries for recall@k vs exact search
    latency_queries: int = 1000  # queries timed one at a time
    k: int = 10  # neighbours per query
    threads: int = 2  # faiss OpenMP threads
    target_recall: float = 0.95  # recall@k that nprobe is raised to reach
    seed: int = 0  # seed of the vectors and queries
    json: bool = False  # print one JSON object instead of the table


def synthetic(
    n: int, dim: int, centres: np.ndarray, noise: float, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = centres[rng.integers(len(centres), size=m)] + rng.standard_normal((m, dim), dtype=np.float32) * (
            noise / np.sqrt(dim)
        )
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def run(cfg: BenchIndexConfig) -> dict:
    import faiss

    faiss.omp_set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    centres = rng.standard_normal((cfg.clusters, cfg.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = synthetic(cfg.vectors, cfg.dim, centres, cfg.noise, rng)
    queries = synthetic(cfg.queries, cfg.dim, centres, cfg.noise, rng)
    rss0 = _peak_rss()
    index, report = build_index(vectors, queries, IndexParams(target_recall=cfg.target_recall, seed=cfg.seed))
    latencies = []
    for q in queries[: cfg.latency_queries]:
        t0 = time.perf_counter()
        index.search(q[None], cfg.k)
        latencies.append(time.perf_counter() - t0)
    ms = np.array(latencies) * 1000
    result = {
        **report,
        "threads": cfg.threads,
        "clusters": cfg.clusters,
        "noise": cfg.noise,
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 3),
        "vectors_bytes": int(vectors.nbytes),
        "peak_rss_bytes": _peak_rss(),
        "peak_rss_before_index_bytes": rss0,
    }
    if cfg.json:
        print(json.dumps(result))
    else:
        print(
            f"index      : {result['factory']} over {result['vectors']} × {result['dim']} (nprobe {result['nprobe']})\n"
            f"recall@10  : {result['recall_at_10']:.4f} vs exact on {result['queries']} held-out queries\n"
            f"latency    : p50 {result['latency_ms_p50']:.2f} ms, p95 {result['latency_ms_p95']:.2f} ms per query "
            f"({cfg.threads} threads)\n"
            f"memory     : index {result['bytes'] / 2**20:.0f} MiB; "
            f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB\n"
            f"build      : {result['build_seconds']:.1f} s (train + add + nprobe tuning)"
        )
    return result


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
