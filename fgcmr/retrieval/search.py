"""``fgcmr search``: text → top-k images, image → top-k captions, over an ``fgcmr index`` directory.

``Searcher`` is the one place queries are answered (the CLI and ``fgcmr serve`` both use it): it
embeds the query with the index's export (``fgcmr.load``) and returns result dicts: ``key``, ``score``
(cosine similarity) and the row's metadata (caption, url, split, category, shard…).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fgcmr.config import Validated
from fgcmr.io import read_json


@dataclasses.dataclass
class SearchConfig(Validated):
    index: str  # fgcmr index output dir
    text: str | None = None  # text query → images
    image: str | None = None  # image file query → captions
    k: int = 10  # results shown
    json: bool = False  # print {"results": [...]} instead of a table
    export: str | None = None  # default: the export the embeddings were made with (index.json)
    device: str | None = None  # default: cuda if available

    def validate(self) -> None:
        if (self.text is None) == (self.image is None):
            raise ValueError('give exactly one query: --text="…" or --image=<path>')
        if self.k < 1:
            raise ValueError("k must be ≥ 1")


class Searcher:
    """The two indexes of an index dir with their metadata, and the model that embeds queries."""

    def __init__(self, index_dir: str | Path, export: str | None = None, device: str | None = None):
        import faiss
        import pyarrow.parquet as pq

        import fgcmr

        self.root = Path(index_dir)
        if not (self.root / "index.json").is_file():
            raise FileNotFoundError(f"{self.root} is not an fgcmr index (no index.json); run `fgcmr index`")
        self.info = read_json(self.root / "index.json")
        self.indexes, self.rows = {}, {}
        for name, report in self.info["indexes"].items():
            self.indexes[name] = faiss.read_index(str(self.root / f"{name}.faiss"))
            if report.get("nprobe"):
                self.indexes[name].nprobe = report["nprobe"]
            self.rows[name] = pq.read_table(self.root / f"{name}.parquet").to_pylist()
        self.model = fgcmr.load(export or self.info["export"], device=device)

    def text_to_images(self, text: str, k: int = 10) -> list[dict]:
        return self._search("images", self.model.encode_text([text]), k)

    def image_to_texts(self, image, k: int = 10) -> list[dict]:
        """``image``: a path, encoded bytes or a PIL image."""
        return self._search("captions", self.model.encode_image([image]), k)

    def _search(self, name: str, query: np.ndarray, k: int) -> list[dict]:
        scores, ids = self.indexes[name].search(np.ascontiguousarray(query, dtype=np.float32), k)
        rows = self.rows[name]
        return [
            {"key": rows[i]["key"], "score": round(float(s), 6), **{c: v for c, v in rows[i].items() if c != "key"}}
            for s, i in zip(scores[0], ids[0])
            if i >= 0
        ]


def run(cfg: SearchConfig) -> list[dict]:
    searcher = Searcher(cfg.index, cfg.export, cfg.device)
    results = (
        searcher.text_to_images(cfg.text, cfg.k) if cfg.text is not None else searcher.image_to_texts(cfg.image, cfg.k)
    )
    if cfg.json:
        print(
            json.dumps(
                {"query": {"text": cfg.text, "image": cfg.image, "k": cfg.k}, "results": results}, ensure_ascii=False
            )
        )
    else:
        for rank, r in enumerate(results, 1):
            print(
                f"{rank:3d}  {r['score']:.4f}  {r['key']:<20}  {r['caption']}  [{r.get('url') or r.get('shard') or ''}]"
            )
    return results
