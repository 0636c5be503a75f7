"""Readers on the real corpora in $FGCMR_DATA and on small Karpathy/JSONL/CSV/folder fixtures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from fgcmr.config import ConfigError
from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.shard.config import Holdout
from fgcmr.shard.job import ShardConfig, run

WIKI_TRAIN = [138, 272, 244, 248, 202, 178, 186, 144, 214, 347]
WIKI_TEST = [34, 88, 96, 85, 65, 58, 51, 41, 71, 104]


def samples(root: Path, split: str) -> list:
    ds = open_dataset(root)
    return [s for path in ds.shards(split) for s in iter_samples(path)]


@pytest.mark.slow
def test_wikipedia_texts_with_original_features(data_root, tmp_path):
    root = data_root / "wikipedia_rasiwasia2010"
    m = run(
        ShardConfig(
            source="wikipedia", root=str(root), features=str(root / "raw_features.mat"), out=str(tmp_path / "wiki")
        )
    )
    assert m["items_in"] == m["items_written"] == 2866 and m["items_skipped"] == 0
    assert m["categories"][0] == "art" and len(m["categories"]) == 10
    assert m["splits"]["train"]["items"] == 2173 and m["splits"]["test"]["items"] == 693
    assert list(m["splits"]["train"]["category_counts"].values()) == WIKI_TRAIN
    assert list(m["splits"]["test"]["category_counts"].values()) == WIKI_TEST
    mat = loadmat(root / "raw_features.mat")
    test = samples(tmp_path / "wiki", "test")
    first_line = (root / "testset_txt_img_cat.list").read_text().splitlines()[0].split("\t")
    assert test[0].meta["id"] == first_line[0] and test[0].category == int(first_line[2]) - 1
    assert "." not in "".join(s.key for s in test)  # ids such as ...-2.11 keep their dots only in the json
    np.testing.assert_allclose(test[0].image_feature, mat["I_te"][0], rtol=1e-6)
    np.testing.assert_allclose(test[-1].text_feature, mat["T_te"][692], rtol=1e-6)
    assert all(s.image is None and s.image_feature.shape == (128,) and len(s.texts[0].split()) > 100 for s in test)
    assert "&nbsp;" not in "".join(s.texts[0] for s in test)


@pytest.mark.slow
def test_web_news_zh_missing_skipped_png_kept(data_root, tmp_path):
    m = run(
        ShardConfig(
            source="wikipedia",
            root=str(data_root / "web_news_zh_testsplit"),
            splits=["test"],
            out=str(tmp_path / "news"),
        )
    )
    assert (m["items_in"], m["items_written"], m["skipped"]) == (500, 497, {"missing_image": 3})
    skipped = [json.loads(line) for line in (tmp_path / "news" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in skipped) == ["1729", "1730", "1784"]
    assert all(s["reason"] == "missing_image" and "culture" in s["detail"] for s in skipped)
    test = samples(tmp_path / "news", "test")
    pngs = [s for s in test if s.image_ext == "png"]
    assert len(pngs) == 10 and len(test) == 497
    for s in pngs:
        img = Image.open(io.BytesIO(s.image))
        img.load()
        assert img.format == "PNG" and list(img.size) == s.meta["image_size"]
    assert all(s.texts[0] and any("\u4e00" <= ch <= "\u9fff" for ch in s.texts[0]) for s in test)


@pytest.mark.slow
def test_flickr8k_captions_grouped_with_standard_splits(data_root, tmp_path):
    root = data_root / "flickr8k_500"
    m = run(
        ShardConfig(
            source="csv",
            root=str(root / "captions.txt"),
            splits_file=str(root / "splits.csv"),
            out=str(tmp_path / "f8k"),
        )
    )
    assert m["items_in"] == m["items_written"] == 500
    assert {s: v["items"] for s, v in m["splits"].items()} == {"train": 382, "dev": 55, "test": 62, "none": 1}
    assert m["categories"] == []
    test = samples(tmp_path / "f8k", "test")
    assert all(len(s.texts) == 5 and s.category is None and s.image_ext == "jpg" for s in test)
    assert m["rows"] == {"rows_in": 2500, "rows_in_items": 2500, "rows_skipped": 0, "skipped": {}}
    (first,) = [s for s in samples(tmp_path / "f8k", "train") if s.meta["id"] == "1000268201_693b08cb0e"]
    assert "A girl going into a wooden building ." in first.texts and first.texts == sorted(first.texts)
    assert first.image == (root / "images" / "1000268201_693b08cb0e.jpg").read_bytes()


def _jpeg(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), colour).save(path, format="JPEG")


def test_karpathy_json(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(tmp_path / "imgs" / "val2014" / name)
    doc = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "train",
                "sentences": [{"raw": "a red box"}, {"raw": "red thing"}],
            },
            {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "another one"}]},
            {"filepath": "val2014", "filename": "c.jpg", "split": "test", "sentences": [{"raw": " "}]},
            {"filepath": "val2014", "filename": "d.jpg", "split": "test", "sentences": [{"raw": "gone"}]},
            {"split": "test"},
        ],
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(doc))
    m = run(
        ShardConfig(
            source="karpathy",
            root=str(tmp_path / "karpathy.json"),
            images=str(tmp_path / "imgs"),
            out=str(tmp_path / "k"),
        )
    )
    assert m["items_in"] == 5 and m["skipped"] == {"bad_record": 1, "empty_text": 1, "missing_image": 1}
    train = samples(tmp_path / "k", "train")
    assert [s.texts for s in train] == [["a red box", "red thing"], ["another one"]]
    assert train[0].meta["id"] == "val2014/a" and train[0].key == "val2014_a"


def test_jsonl_groups_captions_of_one_image(tmp_path):
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        _jpeg(tmp_path / "images" / name)
    rows = [
        {"image": "x.jpg", "caption": "first of x", "category": "dogs", "split": "train"},
        {"image": "x.jpg", "caption": "second of x", "category": "dogs", "split": "train"},
        "{not json",
        {"image": "y.jpg", "caption": "only y", "category": "cats", "split": "test"},
        {"image": "x.jpg", "caption": "x again, later", "category": "dogs", "split": "train"},
        {"image": "z.jpg"},
    ]
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n"
    bad_bytes = b'{"image": "z.jpg", "caption": "caf\xe9"}\n'
    (tmp_path / "caps.jsonl").write_bytes(text.encode() + bad_bytes)
    m = run(ShardConfig(source="jsonl", root=str(tmp_path / "caps.jsonl"), out=str(tmp_path / "j")))
    assert m["categories"] == ["cats", "dogs"]  # sorted: numbering must not depend on row order
    assert (m["items_in"], m["items_written"]) == (5, 2)
    assert m["skipped"] == {"bad_record": 2, "text_not_utf8": 1}
    assert m["rows"] == {
        "rows_in": 7,
        "rows_in_items": 4,
        "rows_skipped": 3,
        "skipped": {"bad_record": 2, "text_not_utf8": 1},
    }
    (x,) = samples(tmp_path / "j", "train")  # a later row of x joins x's item, wherever it sits
    assert (
        x.texts == ["first of x", "second of x", "x again, later"]
        and x.meta["category_name"] == "dogs"
        and x.category == 1
    )
    (y,) = samples(tmp_path / "j", "test")
    assert y.meta["category_name"] == "cats"


def test_folder_layout_with_html(tmp_path):
    root = tmp_path / "tvgraz"
    _jpeg(root / "brass" / "1.jpg")
    (root / "brass" / "1.html").write_text(
        "<html><head><style>p{}</style></head><body><p>A brass&nbsp;horn</p></body></html>"
    )
    _jpeg(root / "guitar" / "7.jpg")
    (root / "guitar" / "7.txt").write_text("an acoustic guitar")
    _jpeg(root / "guitar" / "8.jpg")
    m = run(ShardConfig(source="folder", root=str(root), out=str(tmp_path / "f")))
    assert m["categories"] == ["brass", "guitar"] and m["skipped"] == {"missing_text": 1}
    got = {s.meta["id"]: (s.category, s.texts[0]) for s in samples(tmp_path / "f", "train")}
    assert got == {"brass/1": (0, "A brass\xa0horn"), "guitar/7": (1, "an acoustic guitar")}


@pytest.mark.parametrize(
    "source,make,match",
    [
        ("wikipedia", lambda p: p.mkdir(), "not a Wikipedia-layout corpus"),
        ("folder", lambda p: p.mkdir(), "no category folders"),
        ("csv", lambda p: p.write_text("path,text\n"), r"needs columns \['caption', 'image'\]"),
        ("karpathy", lambda p: p.mkdir(), "must be the karpathy caption file"),
        ("karpathy", lambda p: p.write_text("[1, 2]"), "not a Karpathy JSON file"),
        ("jsonl", lambda p: p.write_text("\n"), "no items found"),
        ("folder", lambda p: (p / "empty_category").mkdir(parents=True), "no items found"),
        (
            "csv",
            lambda p: p.write_bytes(b"PAR1\x15\x04" + bytes(range(256))),
            "is a parquet file .use --source=parquet",
        ),
        ("csv", lambda p: p.write_bytes("image,caption\nx.jpg,caf\xe9\n".encode("utf-16")), "not UTF-8 text"),
        ("parquet", lambda p: p.write_text("image,caption\n"), "not a parquet file"),
        ("img2dataset", lambda p: p.mkdir(), "no NNNNN.parquet files"),
        ("webdataset", lambda p: p.mkdir(), "no .tar files"),
    ],
)
def test_unknown_layout_fails_before_work(tmp_path, source, make, match):
    make(tmp_path / "in")
    with pytest.raises(ConfigError, match=match):
        run(ShardConfig(source=source, root=str(tmp_path / "in"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_folder_layout_with_split_folders(tmp_path):
    root = tmp_path / "tvgraz"
    for split in ("train", "test"):
        _jpeg(root / split / "harp" / "1.jpg")
        (root / split / "harp" / "1.txt").write_text(f"a harp in {split}")
    m = run(ShardConfig(source="folder", root=str(root), out=str(tmp_path / "f")))
    assert list(m["splits"]) == ["train", "test"] and m["items_written"] == 2
    (s,) = samples(tmp_path / "f", "test")
    assert s.meta["id"] == "test/harp/1" and s.texts == ["a harp in test"]


def test_missing_features_file_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="--features .*nope.mat does not exist"):
        run(
            ShardConfig(
                source="wikipedia",
                root=str(data_root / "wikipedia_rasiwasia2010"),
                features=str(tmp_path / "nope.mat"),
                out=str(tmp_path / "o"),
            )
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_wikipedia_holdout_keeps_each_items_feature_row(data_root, tmp_path):
    """Items carved from train into val still carry their own row of I_tr/T_tr."""
    root = data_root / "wikipedia_rasiwasia2010"
    cfg = ShardConfig(
        source="wikipedia",
        root=str(root),
        features=str(root / "raw_features.mat"),
        out=str(tmp_path / "wiki"),
        splits=["val"],
    )
    cfg.holdout = Holdout(fraction=0.2)
    m = run(cfg)
    assert 350 < m["splits"]["val"]["items"] < 520 and set(m["splits"]) == {"val"}
    rows = {
        line.split("\t")[0]: i for i, line in enumerate((root / "trainset_txt_img_cat.list").read_text().splitlines())
    }
    mat = loadmat(root / "raw_features.mat")
    val = samples(tmp_path / "wiki", "val")
    for s in val[:: len(val) // 5]:
        np.testing.assert_allclose(s.image_feature, mat["I_tr"][rows[s.meta["id"]]], rtol=1e-6)
        np.testing.assert_allclose(s.text_feature, mat["T_tr"][rows[s.meta["id"]]], rtol=1e-6)
