"""One loaded item → the tar members of one sample, in the layout ``fgcmr.dataset`` reads."""

from __future__ import annotations

import io
import json

import numpy as np

from fgcmr.shard.records import Item, Skip, make_key
from fgcmr.shard.images import check_image


def clean_texts(texts: list[str]) -> list[str]:
    """Strip every text; an item whose texts are all empty is skipped, empty extra captions are dropped."""
    kept = [t.strip() for t in texts if t and t.strip()]
    if not kept:
        raise Skip("empty_text", "no non-empty text")
    return kept


def encode_sample(item: Item, categories: list[str] | None, data_opts) -> list[tuple[str, bytes]]:
    """``[(member name, bytes)]`` in a fixed order: image or image feature, json, txt, text feature."""
    key = make_key(item.id)
    texts = clean_texts(item.texts)
    if item.image is None and item.image_feature is None:
        raise Skip("missing_image", "neither an image nor an image feature")
    members: list[tuple[str, bytes]] = []
    image_size = None
    if item.image is not None:
        data, ext, image_size = check_image(
            item.image, data_opts.max_pixels, data_opts.max_image_side, data_opts.reencode, data_opts.jpeg_quality
        )
        members.append((f"{key}.{ext}", data))
    if item.image_feature is not None:
        members.append((f"{key}.img.npy", _npy(item.image_feature)))
    meta = {
        "id": item.id,
        "split": item.split,
        "category": item.category,
        "category_name": categories[item.category] if item.category is not None and categories else None,
        "texts": texts,
        "source": item.source,
        "image_size": list(image_size) if image_size else None,
    }
    members.append((f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")))
    members.append((f"{key}.txt", texts[0].encode("utf-8")))
    if item.text_feature is not None:
        members.append((f"{key}.txt.npy", _npy(item.text_feature)))
    return members


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()
