"""The eval stage's outputs in-process: report figure (with and without pixels), TensorBoard scalars, table."""

from __future__ import annotations

import io

import numpy as np
import pytest

from fgcmr.evaluate.job import SCALARS, Embedded, _log_tensorboard, format_table
from fgcmr.evaluate.metrics import retrieval_metrics
from fgcmr.evaluate.report import draw_report, pick_text_queries, top_images


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(12, 8)).astype(np.float32)
    owner = np.repeat(np.arange(12), 2)
    txt = img[owner] + 0.3 * rng.normal(size=(24, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    cat = np.arange(12) % 3
    return img, txt, cat, owner, retrieval_metrics(img, txt, cat, owner)


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def test_report_with_thumbnails_and_feature_only(tmp_path, case):
    img, txt, cat, owner, metrics = case
    asked = []

    def load(i):
        asked.append(i)
        return _png((20 * i, 0, 0))

    texts = [f"text {j}" for j in range(24)]
    emb = Embedded([str(i) for i in range(len(img))], img, txt, cat, owner, texts, None, None, 0)
    with_images = draw_report(tmp_path / "a.png", metrics, emb, load, "t", queries=2)
    queries = pick_text_queries(owner, 2)
    assert len(set(owner[queries])) == 2
    assert sorted(asked) == sorted(top_images(img, txt, queries).ravel().tolist())
    feature_only = draw_report(tmp_path / "b.png", metrics, emb, None, "t", queries=2)
    for path in (with_images, feature_only):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_images_follow_similarity(case):
    img, txt, *_ = case
    top = top_images(img, txt, np.array([0, 5]), k=3)
    sims = txt[[0, 5]] @ img.T
    assert all(np.all(np.diff(sims[r, top[r]]) <= 0) for r in range(2))
    assert top[0, 0] == np.argmax(sims[0])


def test_tensorboard_scalars_and_table(tmp_path, case):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    *_, metrics = case
    metrics = {
        **metrics,
        "splits": {"test": metrics},
        "baselines": {"cca": {"map_i2t": 0.2, "map_t2i": 0.1, "map_avg": 0.15}, "sm": {"skipped": "x"}},
    }
    _log_tensorboard(tmp_path / "tb", {**metrics, "splits": {"test": {**metrics, "map_avg": -1.0}}}, step=7)
    (tmp_path / "tb" / "events.out.tfevents.1.train").write_bytes(b"")  # another writer's file in the same folder
    _log_tensorboard(tmp_path / "tb", metrics, step=7)  # a redone eval: its scalars replace the first's
    assert (
        len(list((tmp_path / "tb").glob("events.*"))) == 2
        and (tmp_path / "tb" / "events.out.tfevents.1.train").exists()
    )
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"eval/test/{k}" for k in SCALARS} <= tags and "baseline/cca/map_avg" in tags
    assert (
        len(acc.Scalars("eval/test/map_avg")) == 1
        and acc.Scalars("eval/test/map_avg")[0].value == pytest.approx(metrics["map_avg"])
        and acc.Scalars("eval/test/map_avg")[0].step == 7
    )
    table = format_table(metrics)
    assert (
        f"{metrics['map_avg']:.4f}" in table
        and "chance MAP@all" in table
        and "cca" in table
        and "sm" not in table.split("cca")[-1]
    )
