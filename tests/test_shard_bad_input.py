"""A planted corpus with every bad-input case: each is kept (and decodes) or counted under its reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.shard.job import ShardConfig, run

KEPT = {"ok": "jpg", "png_as_jpg": "png", "gif_as_jpg": "gif", "cmyk": "jpg", "sixteen_bit": "png", "palette": "png"}
SKIPPED = {
    "missing": "missing_image",
    "zero_byte": "empty_image",
    "truncated": "corrupt_image",
    "not_image": "not_an_image",
    "bomb": "too_many_pixels",
    "no_text": "missing_text",
    "empty_text": "empty_text",
    "latin1_text": "text_not_utf8",
}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpeg = _encode(rgb, "JPEG")
    return {
        "ok": jpeg,
        "png_as_jpg": _encode(rgb.convert("RGBA"), "PNG"),
        "gif_as_jpg": _encode(rgb.convert("P"), "GIF"),
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "sixteen_bit": _encode(Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20), "PNG"),
        "palette": _encode(rgb.quantize(16), "PNG"),
        "zero_byte": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "not_image": b"<html>this is not an image</html>",
        "bomb": _encode(Image.new("RGB", (200, 120)), "PNG"),
        "no_text": jpeg,
        "empty_text": jpeg,
        "latin1_text": jpeg,
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "categories.list").write_text("alpha\nbeta\n")
    (root / "images" / "beta").mkdir(parents=True)
    (root / "texts").mkdir()
    lines = []
    for name, data in _images().items():
        (root / "images" / "beta" / f"{name}.jpg").write_bytes(data)
        lines.append(f"{name}\t{name}\t2")
    lines.append("missing\tmissing\t2")
    for name in [*KEPT, "missing", "zero_byte", "truncated", "not_image", "bomb"]:
        (root / "texts" / f"{name}.xml").write_text(
            f"<document><text>text of {name} &amp; more &nbsp;</text></document>"
        )
    (root / "texts" / "empty_text.txt").write_text("  \n")
    (root / "texts" / "latin1_text.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    lines += ["ok\tok\t2", "this line does not parse", "ok_again\tok\t9"]
    (root / "trainset_txt_img_cat.list").write_text("\n".join(lines) + "\n")
    return root


def shard(corpus: Path, out: Path, **data) -> dict:
    cfg = ShardConfig(source="wikipedia", root=str(corpus), out=str(out))
    cfg.data.max_pixels = 20_000
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return run(cfg)


def test_every_case_kept_or_counted(corpus, tmp_path, capsys):
    m = shard(corpus, tmp_path / "out")
    expected = {**{r: 1 for r in SKIPPED.values()}, "duplicate_id": 1, "bad_list_line": 1, "unknown_category": 1}
    assert m["skipped"] == dict(sorted(expected.items()))
    assert m["items_in"] == len(KEPT) + sum(expected.values()) == m["items_written"] + m["items_skipped"]
    assert "items_in 17 = items_written 6 + items_skipped 11" in capsys.readouterr().out
    skipped = {
        (s["id"], s["reason"]) for s in map(json.loads, (tmp_path / "out" / "skipped.jsonl").read_text().splitlines())
    }
    for name, reason in SKIPPED.items():
        assert (name, reason) in skipped
    assert ("ok", "duplicate_id") in skipped
    assert ("ok_again", "unknown_category") in skipped and ("train-line16", "bad_list_line") in skipped
    stored = {s.key: s for s in iter_samples(open_dataset(tmp_path / "out").shards("train")[0])}
    assert {k: s.image_ext for k, s in stored.items()} == KEPT
    originals = _images()
    for key, s in stored.items():
        assert s.image == originals[key]  # original bytes, stored under the true extension
        Image.open(io.BytesIO(s.image)).load()
        assert s.texts == [f"text of {key} & more"]  # entities decoded, whitespace trimmed


def test_reencode_converts_odd_modes_to_rgb(corpus, tmp_path):
    m = shard(corpus, tmp_path / "out", reencode=True)
    assert m["items_written"] == len(KEPT)
    for s in iter_samples(open_dataset(tmp_path / "out").shards("train")[0]):
        img = Image.open(io.BytesIO(s.image))
        assert s.image_ext == "jpg" and img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 48)
