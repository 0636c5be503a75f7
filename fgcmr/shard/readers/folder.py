"""The class-folder layout (TVGraz style): ``<root>/[<split>/]<category>/<stem>.<image>`` with a
same-stem ``.txt`` or ``.html`` beside each image (HTML is stripped to its visible text).

Categories are the sorted folder names. When ``root`` holds ``train``/``val``/``test`` folders, those
are the splits; otherwise every item is in ``default_split``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from fgcmr.config import ConfigError
from fgcmr.shard.readers.text import read_text_file
from fgcmr.shard.records import Item, Ref, Skip
from fgcmr.shard.readers import Reader

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
TEXT_SUFFIXES = (".txt", ".html", ".htm")
SPLIT_DIRS = ("train", "val", "dev", "test")


class FolderReader(Reader):
    def __init__(self, root: Path, default_split: str = "train"):
        if not root.is_dir():
            raise ConfigError(f"--root {root} must be a directory for source='folder'")
        split_dirs = [s for s in SPLIT_DIRS if (root / s).is_dir()]
        self.split_roots = [(s, root / s) for s in split_dirs] or [(default_split, root)]
        self.id_prefix = bool(split_dirs)  # the same stem may appear in two splits
        names = {
            d.name for _, base in self.split_roots for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
        }
        if not names:
            raise ConfigError(f"{root} is not a class-folder corpus: no category folders")
        self.root = root
        self.categories = sorted(names)

    def refs(self) -> Iterator[Ref]:
        for split, base in self.split_roots:
            for category, name in enumerate(self.categories):
                folder = base / name
                if folder.is_dir():
                    yield from self._folder_refs(split, category, folder)

    def _folder_refs(self, split: str, category: int, folder: Path) -> Iterator[Ref]:
        stems: dict[str, dict[str, str]] = {}
        for entry in sorted(os.listdir(folder)):
            stem, suffix = os.path.splitext(entry)
            kind = "image" if suffix.lower() in IMAGE_SUFFIXES else "text" if suffix.lower() in TEXT_SUFFIXES else None
            if kind and not entry.startswith("."):
                stems.setdefault(stem, {}).setdefault(kind, entry)
        for stem, files in stems.items():
            item_id = f"{split}/{folder.name}/{stem}" if self.id_prefix else f"{folder.name}/{stem}"
            if "image" not in files:
                yield Ref(
                    id=item_id,
                    split=split,
                    category=category,
                    skip=("missing_image", f"{folder / files['text']} has no image beside it"),
                )
            elif "text" not in files:
                yield Ref(
                    id=item_id,
                    split=split,
                    category=category,
                    skip=("missing_text", f"{folder / files['image']} has no .txt/.html beside it"),
                )
            else:
                yield Ref(
                    id=item_id,
                    split=split,
                    category=category,
                    data=(str(folder / files["image"]), str(folder / files["text"])),
                )

    def load(self, ref: Ref) -> Item:
        image_path, text_path = map(Path, ref.data)
        try:
            image = image_path.read_bytes()
        except OSError as e:
            raise Skip("missing_image", f"{image_path}: {e}") from None
        return Item(
            id=ref.id,
            split=ref.split,
            category=ref.category,
            texts=[read_text_file(text_path)],
            source=str(image_path.relative_to(self.root)),
            image=image,
        )
