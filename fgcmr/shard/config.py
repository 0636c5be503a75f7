"""``fgcmr shard``'s config and ``done`` check, free of numpy and image code: the pipeline builds and checks it
before any stage runs, and the check reads only the manifest and the shards' sizes."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fgcmr.config import Validated, to_dict
from fgcmr.io import read_json
from fgcmr.run import DONE, Check, diff

if TYPE_CHECKING:
    from fgcmr.shard.records import Ref

# Options that change how the job runs but never what it writes.
EXECUTION_FIELDS = ("out", "workers", "task_index", "num_tasks", "merge")
WORK_DIR = ".parts"  # under the output: each task's chunks and plan until the merge assembles them
GROUP_BY = ("url", "sha256", "none")


@dataclasses.dataclass
class DataOptions(Validated):
    """Shard limits and image handling."""

    max_items_per_shard: int = 1000  # items per shard (a shard closes at this or max_bytes_per_shard)
    max_bytes_per_shard: int = 1 << 30  # a shard exceeds it only by tar's padding to a 10 KiB record
    max_image_side: int = 0  # > 0: images with a longer side are downscaled and re-encoded as JPEG
    reencode: bool = False  # re-encode every image as RGB JPEG (else original bytes are kept)
    jpeg_quality: int = 90  # quality of re-encoded JPEGs (1-100)
    max_pixels: int = 64_000_000  # decompression-bomb guard: larger images are skipped

    def validate(self) -> None:
        for name in ("max_items_per_shard", "max_bytes_per_shard", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.max_image_side < 0:
            raise ValueError(f"max_image_side={self.max_image_side} must be 0 (keep) or positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in 1..100")


@dataclasses.dataclass
class Holdout(Validated):
    """A validation carve: ``fraction`` of the ``source`` split's items go to split ``split`` instead.

    Membership is decided by a hash of the item id and ``seed``, so it is the same on every rerun, in
    every task of an array and for any number of workers, and an item (with all its captions) lands
    wholly on one side. Hyperparameters are chosen on this split, never on the test split.
    """

    fraction: float = 0.0  # share of the source split's items moved to the holdout split; 0: none
    source: str = "train"  # the split carved from
    split: str = "val"  # the split the carved items go to
    seed: int = 0  # seed of the membership hash

    def validate(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"holdout.fraction must lie in [0, 1), got {self.fraction}")
        if self.fraction and self.split == self.source:
            raise ValueError("holdout.split must differ from holdout.source")

    def split_of(self, ref: Ref) -> str:
        if not self.fraction or ref.split != self.source:
            return ref.split
        digest = hashlib.sha256(f"{self.seed}:{ref.id}".encode()).digest()
        return self.split if int.from_bytes(digest[:8], "big") < self.fraction * 2**64 else ref.split


@dataclasses.dataclass
class ShardConfig(Validated):
    """What to shard, where to, and how to split the work."""

    # the corpus reader
    source: Literal[
        "wikipedia", "folder", "karpathy", "jsonl", "csv", "parquet", "img2dataset", "webdataset", "synthetic"
    ] = "synthetic"
    root: str | None = (
        None  # input directory (wikipedia, folder, img2dataset, webdataset) or file(s) (karpathy, jsonl, csv, parquet)
    )
    out: str = "shards/synthetic"  # dataset dir written (shards + manifest.json)
    name: str | None = None  # dataset name in the manifest; default: the out directory's name
    features: str | None = None  # wikipedia: .mat with I_tr/I_te (image) and/or T_tr/T_te (text) rows in list order
    images: str | None = None  # caption corpora: image directory (default: beside the root file)
    splits_file: str | None = None  # caption corpora: CSV image,split giving each image's split
    default_split: str = "train"  # split of items that name none
    # Row corpora (csv, jsonl, parquet, img2dataset, webdataset): one row per (image, caption), grouped
    # across the whole corpus into one item per image (fgcmr.shard.grouping).
    group_by: Literal["url", "sha256", "none"] = "url"  # url: the image column / url; sha256: image content
    image_col: str = "image"  # csv/jsonl/parquet: image path (under --images)
    caption_col: str = "caption"  # csv/jsonl/parquet: caption column
    split_col: str = "split"  # used where present (a saved img2dataset column, a json field)
    category_col: str = "category"  # used where present
    image_exts: str = "jpg;png;webp"  # webdataset: image member extensions, first present wins
    text_field: str = "txt"  # webdataset: the caption member's extension, or json.<field> of the json member
    splits: list[str] = dataclasses.field(default_factory=list)  # shard only these splits (default: all)
    workers: int = 1  # processes reading and encoding items
    task_index: int = 0  # this task's index in a Slurm array of num_tasks tasks
    num_tasks: int = 1  # tasks sharding the corpus in parallel; then run once with --merge
    merge: bool = False  # assemble the output of a finished Slurm array of num_tasks tasks
    items: int = 1000  # synthetic: number of items
    seed: int = 0  # synthetic: generator seed
    image_size: int = 64  # synthetic: image side in pixels
    captions: int = 5  # synthetic: captions per image
    atypical: float = 0.0  # synthetic: chance a caption uses a rare paraphrase of its shape (planted hard positive)
    mislabel: float = 0.0  # synthetic: chance a caption names the confusable partner shape (planted wrong text)
    data: DataOptions = dataclasses.field(default_factory=DataOptions)
    holdout: Holdout = dataclasses.field(default_factory=Holdout)

    def validate(self) -> None:
        if self.source != "synthetic" and not self.root and not self.merge:
            raise ValueError(f"--root is required for source={self.source!r}")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be at least 1")
        if self.num_tasks < 1 or not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"task_index={self.task_index} must be in 0..num_tasks-1 (num_tasks={self.num_tasks})")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by={self.group_by!r} must be one of {', '.join(GROUP_BY)}")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be at least 8")


def done(cfg: ShardConfig) -> Check:
    """Done when the manifest was made with this config and every shard it lists has its recorded size."""
    out = Path(cfg.out)
    path = out / "manifest.json"
    if not path.is_file():
        return Check(False, f"no dataset in {out}", exists=(out / WORK_DIR).is_dir())
    manifest = read_json(path)
    wanted = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS}
    changes = diff(manifest.get("config") or {}, wanted)
    if changes:
        return Check(False, f"config changed ({', '.join(changes)})", exists=True)
    for split in manifest["splits"].values():
        for s in split["shards"]:
            f = out / s["file"]
            if not f.is_file() or f.stat().st_size != s["bytes"]:
                return Check(False, f"shard {f} is missing or not {s['bytes']} bytes", exists=True)
    return DONE
