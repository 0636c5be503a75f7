"""Using a model: the public API, self-contained exports, embed (N ranks, resume), index, search, eval reuse.

In-process on an untrained tiny model built directly (``build_model`` + ``save_pretrained``), except
the one 2-rank ``fgcmr embed`` launch. The trained-model paths (wheel install, browser) are in
``test_use_e2e.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fgcmr.dataset import iter_samples, open_dataset

REPO = Path(__file__).resolve().parents[1]


def make_export(dataset: Path, out: Path, provenance: dict | None = None, seed: int = 0) -> Path:
    """An untrained tiny export with a tokenizer fitted on the dataset's texts."""
    from fgcmr.model import build_model
    from fgcmr.text import ensure_tokenizer
    from fgcmr.train.config import load_model_config

    texts = [t for p in open_dataset(dataset).shards("train")[:2] for s in iter_samples(p, {"json"}) for t in s.texts]
    cfg = load_model_config("tiny")
    cfg.text.tokenizer_dir = str(ensure_tokenizer(texts, out.parent / f"{out.name}-tokenizer", 400, min_frequency=0))
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    model.save_pretrained(out, provenance=provenance or {"run": "in-process", "step": 0})
    return out


@pytest.fixture(scope="module")
def export(synthetic_dataset: Path, tmp_path_factory) -> Path:
    return make_export(synthetic_dataset, tmp_path_factory.mktemp("export") / "export")


def test_export_is_self_contained_and_api_embeds_like_eval(export: Path, synthetic_dataset: Path):
    import fgcmr
    from PIL import Image
    from safetensors import safe_open

    from fgcmr.model import TwoTower, load_export

    cfg = json.loads((export / "model_config.json").read_text())
    assert cfg["image"]["preprocess"] == {
        "input_size": [3, 64, 64],
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 0.95,
        "crop_mode": "center",
    }
    assert cfg["fgcmr"]["version"] == fgcmr.__version__ and cfg["fgcmr"]["embed_dim"] == 64
    assert cfg["fgcmr"]["max_text_length"] == 32 and cfg["fgcmr"]["provenance"] == {"run": "in-process", "step": 0}
    assert cfg["text"]["tokenizer_dir"] == "tokenizer" and (export / "tokenizer" / "tokenizer.json").is_file()
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["model_config"]) == cfg and f.metadata()["fgcmr_version"] == fgcmr.__version__

    model = fgcmr.load(export, device="cpu")
    assert model.embed_dim == 64 and model.preprocess.mean == (0.5,) * 3 and model.preprocess.size == (64, 64)
    net, _, inputs = load_export(export)
    sample = next(iter_samples(open_dataset(synthetic_dataset).shards("test")[0]))
    with Image.open(io.BytesIO(sample.image)) as im:
        pil = im.convert("RGB")
    x = model.preprocess(pil)
    assert x.dtype == torch.float32 and x.min() < -0.2  # normalised: (x/255 - 0.5) / 0.5 reaches below 0
    torch.testing.assert_close(x, inputs.image(sample))  # exactly the eval input
    with torch.no_grad():
        want_img = net.encode_image(inputs.image(sample)[None]).numpy()
        want_txt = net.encode_text(inputs.collate_texts([inputs.text(sample, 0)])).numpy()
    path = export.parent / "sample.jpg"
    path.write_bytes(sample.image)
    got = model.encode_image([pil, str(path), sample.image, path], batch_size=3)
    assert got.shape == (4, 64) and isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, np.repeat(want_img, 4, 0), atol=1e-5)
    txt = model.encode_text([sample.texts[0], "another caption"], as_tensor=True)
    assert isinstance(txt, torch.Tensor) and txt.shape == (2, 64)
    np.testing.assert_allclose(txt[:1].numpy(), want_txt, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    sims = model.similarity(txt.numpy(), got)
    assert sims.shape == (2, 4) and np.isclose(sims[0, 0], float((want_txt @ want_img.T)[0, 0]), atol=1e-5)

    # HF-style round trip; the stored constants, not timm's registry, drive preprocessing
    again = TwoTower.from_pretrained(export)
    copy = again.save_pretrained(export.parent / "copy")
    for a, b in zip(net.state_dict().values(), TwoTower.from_pretrained(copy).state_dict().values()):
        torch.testing.assert_close(a, b)
    changed = json.loads((copy / "model_config.json").read_text())
    changed["image"]["preprocess"]["mean"] = [0.0, 0.0, 0.0]
    (copy / "model_config.json").write_text(json.dumps(changed))
    assert fgcmr.load(copy, device="cpu").preprocess(pil).min() >= 0  # mean 0, std 0.5: all pixels ≥ 0

    # a fresh process: `import fgcmr` stays cheap, loading imports no DeepSpeed
    code = (
        f"import sys, fgcmr; cheap = 'torch' not in sys.modules; m = fgcmr.load({str(export)!r}, device='cpu'); "
        "print(cheap, 'deepspeed' in sys.modules, m.encode_text(['a red circle']).shape)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=export.parent)
    assert res.stdout.split()[-4:] == ["True", "False", "(1,", "64)"], res.stderr[-2000:]


def test_readme_example_runs_as_written(export: Path, tmp_path: Path):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use a trained model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "runs" / "demo" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "run" / "export").symlink_to(export)
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Preprocess(size=(64, 64)" in res.stdout and " 64 0" in res.stdout  # embed_dim, provenance step


@pytest.mark.slow
def test_embed_two_ranks_resume_index_search_eval_reuse(export: Path, synthetic_dataset: Path, tmp_path: Path, capsys):
    import pyarrow.parquet as pq

    from fgcmr.launch import torchrun_command
    from fgcmr.evaluate.job import embed_split, reuse_embeddings
    from fgcmr.evaluate.metrics import retrieval_metrics
    from fgcmr.retrieval import embed as embed_job
    from fgcmr.retrieval.index import IndexConfig
    from fgcmr.retrieval.index import run as build_indexes
    from fgcmr.retrieval.search import SearchConfig
    from fgcmr.retrieval.search import run as search

    out = tmp_path / "emb"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["-m", "fgcmr.cli", "embed", f"--export={export}", f"--shards={synthetic_dataset}", f"--out={out}"]
    cmd = torchrun_command(2, [*args, "--dtype=float32"])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    dataset = open_dataset(synthetic_dataset)
    manifest = json.loads((out / "embeddings.json").read_text())
    shards = [(s, p) for s in dataset.split_names for p in dataset.shards(s)]
    assert len(manifest["parts"]) == len(shards) and manifest["world_size"] == 2 and manifest["dim"] == 64
    assert manifest["images"] == sum(dataset.items(s) for s in dataset.split_names)
    for i, (split, shard) in enumerate(shards):  # part i is shard i, rows in shard order
        samples = list(iter_samples(shard))
        meta = pq.read_table(out / f"metadata/metadata_{i:04d}.parquet").to_pylist()
        assert [m["key"] for m in meta] == [s.key for s in samples] and {m["split"] for m in meta} == {split}
        assert [m["caption"] for m in meta] == [s.texts[0] for s in samples]
        assert [m["category"] for m in meta] == [s.category for s in samples] and meta[0]["url"] == samples[0].meta[
            "source"
        ]
        img = np.load(out / f"img_emb/img_emb_{i:04d}.npy")
        assert img.dtype == np.float32 and img.shape == (len(samples), 64)
        caps = np.load(out / f"captions/caption_emb_{i:04d}.npy")
        assert caps.shape[0] == sum(len(s.texts) for s in samples)
        first = np.load(out / f"text_emb/text_emb_{i:04d}.npy")
        np.testing.assert_array_equal(first, caps[np.cumsum([0] + [len(s.texts) for s in samples[:-1]])])

    # resume: intact parts are kept untouched, a truncated one and a stale record are redone
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    np.save(out / "img_emb/img_emb_0001.npy", np.zeros((3, 64), np.float32))
    record = json.loads((out / "parts/part_0002.json").read_text())
    (out / "parts/part_0002.json").write_text(json.dumps({**record, "shard_sha256": "0" * 64}))
    embed_job.run(
        embed_job.EmbedConfig(export=str(export), shards=str(synthetic_dataset), out=str(out), dtype="float32")
    )
    redone = {p for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert {p.name for p in redone} == {
        "img_emb_0001.npy",
        "img_emb_0002.npy",
        "text_emb_0001.npy",
        "text_emb_0002.npy",
        "caption_emb_0001.npy",
        "caption_emb_0002.npy",
    }
    assert np.load(out / "img_emb/img_emb_0001.npy").shape[0] == record["images"]

    # eval reuses the embeddings: same metrics as embedding the split again
    from fgcmr.distributed import DistEnv
    from fgcmr.model import load_export

    net, _, inputs = load_export(export)
    fresh = embed_split(dataset, "test", net, inputs, DistEnv(), 32, keep_features=False)
    reused = reuse_embeddings(str(out), "test", export, dataset)
    assert reused.keys == fresh.keys and reused.texts == fresh.texts
    np.testing.assert_array_equal(reused.txt_owner, fresh.txt_owner)
    np.testing.assert_allclose(reused.img_emb, fresh.img_emb, atol=1e-5)
    a = retrieval_metrics(reused.img_emb, reused.txt_emb, reused.img_cat, reused.txt_owner)
    b = retrieval_metrics(fresh.img_emb, fresh.txt_emb, fresh.img_cat, fresh.txt_owner)
    assert a["map_avg"] == pytest.approx(b["map_avg"], abs=1e-4)
    other = make_export(synthetic_dataset, tmp_path / "other", seed=1)
    from fgcmr.config import ConfigError

    with pytest.raises(ConfigError, match="another model"):
        reuse_embeddings(str(out), "test", other, dataset)

    # index: exact, and IVF (forced by a low threshold) reaching its recall target; search over them
    for name, exact_below in (("exact", 50_000), ("ivf", 10)):
        info = build_indexes(
            IndexConfig(
                embeddings=str(out), out=str(tmp_path / name), splits=["test"], exact_below=exact_below, queries=200
            )
        )
        images = info["indexes"]["images"]
        assert images["vectors"] == dataset.items("test") and images["bytes"] > images["vectors"] * 64 * 4 * 0.9
        assert images["kind"] == ("exact" if name == "exact" else "ivf") and images["recall_at_10"] >= 0.95
    capsys.readouterr()
    query = next(iter_samples(dataset.shards("test")[0]))
    results = search(SearchConfig(index=str(tmp_path / "exact"), text=query.texts[1], k=5, json=True))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["results"] == results and len(results) == 5 and set(results[0]) >= {"key", "score", "caption", "url"}
    test_img = np.concatenate([np.load(out / r["files"]["img"]) for r in manifest["parts"] if r["split"] == "test"])
    q = net.encode_text(inputs.collate_texts([inputs.text(query, 1)])).detach().numpy()
    assert [r["score"] for r in results] == pytest.approx(np.sort(test_img @ q[0])[::-1][:5], abs=1e-4)
    (tmp_path / "q.jpg").write_bytes(query.image)
    texts = search(SearchConfig(index=str(tmp_path / "exact"), image=str(tmp_path / "q.jpg"), k=3))
    assert len(texts) == 3 and all("caption" in r and "text_index" in r for r in texts)
    assert "0." in capsys.readouterr().out
