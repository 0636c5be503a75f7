"""The Wikipedia benchmark layout (Rasiwasia et al. 2010), also used by the Chinese sets.

``trainset_txt_img_cat.list`` / ``testset_txt_img_cat.list`` (``text_id<TAB>image_id<TAB>category``,
categories 1-based), ``categories.list``, ``texts/<text_id>.xml|.txt``, ``images/<category>/<image_id>.jpg``.
With ``features`` (a .mat with ``I_tr``/``I_te`` and/or ``T_tr``/``T_te``, rows in list order) the
image (and text) features are stored as ``.npy`` instead of / beside the files.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import numpy as np

from fgcmr.config import ConfigError
from fgcmr.shard.readers.text import read_text_file
from fgcmr.shard.records import Item, Ref, Skip
from fgcmr.shard.readers import Reader

LISTS = {"train": "trainset_txt_img_cat.list", "test": "testset_txt_img_cat.list"}
FEATURE_KEYS = {"train": ("I_tr", "T_tr"), "test": ("I_te", "T_te")}


class WikipediaReader(Reader):
    def __init__(self, root: Path, features: str | None = None):
        self.root = root
        lists = [name for name in LISTS.values() if (root / name).is_file()]
        if not root.is_dir() or not (root / "categories.list").is_file() or not lists:
            raise ConfigError(
                f"{root} is not a Wikipedia-layout corpus: it needs categories.list and at least one of "
                f"{', '.join(LISTS.values())}"
            )
        if not (root / "texts").is_dir():
            raise ConfigError(f"{root}: no texts/ directory")
        self.features = Path(features) if features else None
        if self.features is not None and not self.features.is_file():
            raise FileNotFoundError(f"--features {self.features} does not exist")
        if self.features is not None and not _load_features(str(self.features)):
            raise ConfigError(f"--features {self.features} has none of the variables I_tr, I_te, T_tr, T_te")
        if self.features is None and not (root / "images").is_dir():
            raise ConfigError(f"{root}: no images/ directory and no --features file; nothing to pair the texts with")
        lines = (root / "categories.list").read_text(encoding="utf-8").splitlines()
        self.categories = [line.strip() for line in lines if line.strip()]

    def refs(self) -> Iterator[Ref]:
        for split, name in LISTS.items():
            path = self.root / name
            if not path.is_file():
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                for row, line in enumerate(f):
                    if line.strip():
                        yield self._ref(split, row, line)

    def _ref(self, split: str, row: int, line: str) -> Ref:
        fields = line.split()
        where = f"{LISTS[split]}:{row + 1}"
        if len(fields) != 3 or not fields[2].isdigit():
            return Ref(
                id=f"{split}-line{row + 1}", split=split, skip=("bad_list_line", f"{where}: {line.strip()[:200]!r}")
            )
        text_id, image_id, cat = fields
        category = int(cat) - 1
        if not 0 <= category < len(self.categories):
            return Ref(
                id=text_id,
                split=split,
                skip=(
                    "unknown_category",
                    f"{where}: category {cat} not in categories.list (1..{len(self.categories)})",
                ),
            )
        return Ref(
            id=text_id, split=split, category=category, data=(image_id, split, row)
        )  # the list's split: a holdout may rename ref.split

    def load(self, ref: Ref) -> Item:
        image_id, list_split, row = ref.data
        text_path = self._text_path(ref.id)
        item = Item(
            id=ref.id,
            split=ref.split,
            category=ref.category,
            texts=[read_text_file(text_path)],
            source=str(text_path.relative_to(self.root)),
        )
        if self.features is not None:
            item.image_feature, item.text_feature = self._feature_rows(list_split, row)
            if item.image_feature is not None:
                return item
        image_path = self.root / "images" / self.categories[ref.category] / f"{image_id}.jpg"
        try:
            item.image = image_path.read_bytes()
        except FileNotFoundError:
            raise Skip("missing_image", str(image_path.relative_to(self.root))) from None
        item.source += f" {image_path.relative_to(self.root)}"
        return item

    def _text_path(self, text_id: str) -> Path:
        for ext in (".xml", ".txt"):
            path = self.root / "texts" / f"{text_id}{ext}"
            if path.is_file():
                return path
        raise Skip("missing_text", f"texts/{text_id}.xml|.txt")

    def _feature_rows(self, split: str, row: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        mats = _load_features(str(self.features))
        rows = []
        for key in FEATURE_KEYS[split]:
            matrix = mats.get(key)
            if matrix is not None and row >= len(matrix):
                raise Skip("missing_feature", f"{key} has {len(matrix)} rows, list line {row + 1}")
            rows.append(None if matrix is None else matrix[row])
        return rows[0], rows[1]


@functools.lru_cache(maxsize=2)
def _load_features(path: str) -> dict[str, np.ndarray]:
    """The feature matrices of a .mat file (loaded once per process; they are small next to images)."""
    from scipy.io import loadmat

    mat = loadmat(path)
    return {k: np.asarray(v) for k, v in mat.items() if k in {"I_tr", "I_te", "T_tr", "T_te"}}
