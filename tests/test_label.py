"""The label stage end to end on synthetic shards: train → infer (1 and 2 ranks, killed and resumed),
verification of missing and corrupt sidecars, and the pieces that make 1 rank equal 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from fgcmr.config import load_config
from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.launch import torchrun_command
from fgcmr.io import read_json, sha256_file
from fgcmr.label import infer, train
from fgcmr.label.encode import embed_texts
from fgcmr.label.model import load_labeler
from fgcmr.label.texts import TextSet
from fgcmr.labels import SidecarError, labels_dir, read_head, read_sidecar, sidecar_path, verify_labels
from kills import running, torchrun_and_ranks
from waits import run_following, wait_procs, wait_until

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def labeler(synthetic_dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("labelers") / "tiny"
    cfg = load_config(
        train.LabelTrainConfig,
        REPO / "configs/labelers/tiny.yaml",
        {
            "shards": str(synthetic_dataset),
            "out": str(out),
            "max_steps": 60,
            "eval_every": 20,
            "max_eval_texts": 300,
            "threads": 1,
        },
    )
    return out, train.run(cfg)


def infer_cfg(dataset: Path, labeler: Path, **kw) -> infer.LabelInferConfig:
    return load_config(
        infer.LabelInferConfig, None, {"shards": str(dataset), "labeler": str(labeler), "threads": 1, **kw}
    )


def infer_on_two_ranks(*args: str) -> list[str]:
    return torchrun_command(2, ["-m", "fgcmr.cli", "label", "infer", *args])


def test_train_writes_a_self_contained_labeler(labeler, synthetic_dataset):
    out, metrics = labeler
    for f in (
        "encoder/config.json",
        "tokenizer/tokenizer.json",
        "head.safetensors",
        "labeler.json",
        "config.yaml",
        "metrics.json",
    ):
        assert (out / f).is_file(), f
    assert read_json(out / "metrics.json") == json.loads(json.dumps(metrics))
    for part in ("train", "val", "test"):
        assert metrics[part]["positive_pairs"] > 0 and metrics[part]["negative_pairs"] > 0
    # 48 test images × 5 captions, every unordered pair once
    assert metrics["texts"] == 240 and metrics["positive_pairs"] + metrics["negative_pairs"] == 240 * 239 // 2
    assert metrics["auc"] > 0.6, metrics  # synthetic categories are learnable in a few dozen steps
    assert metrics["train"]["hardness_std"] > 0.05  # labels spread, not all 0 or all 1
    # TensorBoard: the loss at every step; the final AUCs at the last step trained, never at step 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("label/loss")] == list(range(1, metrics["steps"] + 1))
    for part in ("train", "test"):
        assert [e.step for e in events.Scalars(f"label/{part}_auc")] == [metrics["steps"]]
    assert events.Scalars("label/test_auc")[0].value == pytest.approx(metrics["auc"])
    assert min(e.step for e in events.Scalars("label/val_auc")) == 20  # eval_every
    # the head was calibrated on held-out pairs: balanced probabilities, mean p on val negatives
    # about 1 − mean p on val positives (the balanced Platt optimum's stationarity)
    assert metrics["calibration"]["scale"] > 0
    val = metrics["val"]
    assert val["mean_p_negative"] == pytest.approx(1 - val["mean_p_positive"], abs=0.05)


def test_platt_scaling_recovers_scale_and_balances_classes():
    from fgcmr.label.metrics import fit_platt

    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, generator=g) * 2
    y = (torch.rand(20000, generator=g) < torch.sigmoid(1.7 * z)).float()  # symmetric: classes about balanced
    a, b = fit_platt(z, y)
    assert a == pytest.approx(1.7, rel=0.08) and abs(b) < 0.1
    # unbalanced (1 positive in 10): the balanced fit still gives mean p(neg) = 1 − mean p(pos)
    y2 = (z > 2.5).float()
    z2 = z + 0.5 * torch.randn(20000, generator=g)
    a2, b2 = fit_platt(z2, y2)
    p = torch.sigmoid(a2 * z2.double() + b2)
    assert a2 > 0 and p[y2 == 0].mean().item() == pytest.approx(1 - p[y2 > 0].mean().item(), abs=1e-3)


def test_embeddings_do_not_depend_on_batching(labeler):
    """Why 1 rank equals N ranks: a text's embedding ignores the other texts in its batch."""
    model, tokenizer, max_length = load_labeler(labeler[0])
    texts = [
        "a red circle",
        "two large blue plus signs in the top left corner",
        "a star",
        "three small green rings",
        "x",
    ]
    a = embed_texts(model, tokenizer, texts, max_length, 1, torch.device("cpu"))
    b = embed_texts(model, tokenizer, texts, max_length, 4, torch.device("cpu"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5))


def test_pair_sampler_draws_positive_partners():
    texts = TextSet([f"t{i}" for i in range(8)], np.array([-1] * 8), np.array([0, 0, 1, 1, 2, 2, 3, 3]))
    idx = train.PairSampler(texts, seed=0)(50)
    a, p = idx[:50], idx[50:]
    assert (texts.image[a] == texts.image[p]).all() and (a != p).all()


def test_balanced_bce_weights_classes_equally():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    valid = torch.ones_like(y, dtype=torch.bool)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    expected = 0.5 * bce[y > 0].mean() + 0.5 * bce[y == 0].mean()
    torch.testing.assert_close(train.balanced_bce(logits, y, valid), expected)


def test_early_stopping_fires_after_patience_evaluations_without_a_better_auc():
    stop = train.EarlyStopping(patience=3, min_delta=0.01)
    curve = [(25, 0.70), (50, 0.80), (75, 0.805), (100, 0.81), (125, 0.84), (150, 0.845), (175, 0.83), (200, 0.849)]
    seen = [stop.update(step, auc) for step, auc in curve]
    assert [better for better, _ in seen] == [True, True, False, False, True, False, False, False]
    assert [s for s, (_, halt) in zip(curve, seen) if halt] == [(200, 0.849)]  # 3rd stale in a row after 125
    assert (stop.best, stop.best_step) == (0.84, 125)  # gains below min_delta do not reset patience
    # the configs that ship can stop before max_steps (wikipedia's could not: 150 steps, 3 × 50)
    from fgcmr.pipeline import resolve_experiment, stage_configs

    shipped = [
        load_config(train.LabelTrainConfig, REPO / "configs/labelers" / f"{n}.yaml", {"shards": "s", "out": "o"})
        for n in ("tiny", "scratch", "minilm")
    ]
    shipped.append(stage_configs(resolve_experiment(REPO / "configs/experiments/wikipedia.yaml", "o", {})[0])["label"])
    assert all(train.earliest_stop(cfg) < cfg.max_steps for cfg in shipped), shipped


@pytest.mark.slow
def test_infer_one_rank_equals_two_ranks_killed_and_resumed(labeler, synthetic_dataset, tmp_path):
    ds = open_dataset(synthetic_dataset)
    shards = [s for split in ds.split_names for s in ds.shards(split)]
    run_one = infer.run(infer_cfg(synthetic_dataset, labeler[0], name="one"))
    assert run_one["counts"]["train"]["items"] == 192 and run_one["counts"]["test"]["texts"] == 48 * 5
    w, c = read_head(synthetic_dataset, "one")
    assert w.shape == (64,)
    for shard in shards:  # keys aligned with the data shards, sha256 as recorded
        path = sidecar_path(synthetic_dataset, "one", shard.name)
        read_sidecar(path, [s.key for s in iter_samples(shard)])
        assert run_one["sidecars"][path.name]["sha256"] == sha256_file(path)
    assert list((labels_dir(synthetic_dataset, "one") / "tensorboard").glob("events.*"))

    # Two ranks, killed once the first sidecar is out, then rerun to completion.
    out_two = labels_dir(synthetic_dataset, "two")
    args = [f"--shards={synthetic_dataset}", f"--labeler={labeler[0]}", "--name=two", "--threads=1"]
    job = subprocess.Popen(
        infer_on_two_ranks(*args, "--batch_size=1"),
        env=ENV,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(
        lambda: list(out_two.glob("*.npz")) or job.poll() is not None, [job], [out_two.parent], early_exit_ok=True
    )
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    written = len(list(out_two.glob("*-*.npz")))
    assert 0 < written < len(shards) and not (out_two / "manifest.json").exists(), "the job was not interrupted mid-way"

    # Killed again, one rank only this time (SIGKILL), once it has written more: torchrun ends the other rank.
    job = subprocess.Popen(
        infer_on_two_ranks(*args, "--batch_size=1"),
        env=ENV,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ranks: list[psutil.Process] = []

    def rank_wrote() -> bool:
        ranks[:] = torchrun_and_ranks(job.pid)[1]
        return (len(ranks) == 2 and len(list(out_two.glob("*-*.npz"))) > written) or job.poll() is not None

    wait_until(rank_wrote, [job], [out_two.parent], early_exit_ok=True)
    assert len(ranks) == 2, f"the job ended before a rank could be killed ({job.poll()})"
    ranks[1].kill()
    assert wait_procs([job], [out_two.parent]) != [0]
    assert not [p for p in ranks if running(p)], "torchrun left a rank running after the other was killed"
    done = run_following(infer_on_two_ranks(*args), env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kept" in done.stderr
    manifest = read_json(out_two / "manifest.json")
    assert manifest["world_size"] == 2 and manifest["counts"] == run_one["counts"]
    for shard in shards:
        one = read_sidecar(sidecar_path(synthetic_dataset, "one", shard.name))
        two = read_sidecar(sidecar_path(synthetic_dataset, "two", shard.name), [s.key for s in iter_samples(shard)])
        assert (one.keys == two.keys).all() and (one.text_offsets == two.text_offsets).all()
        np.testing.assert_allclose(one.text_emb, two.text_emb, atol=2e-3)
        np.testing.assert_allclose(one.desc_emb, two.desc_emb, atol=2e-3)

    # A missing and a corrupt sidecar are reported, and a rerun repairs exactly those.
    assert verify_labels(synthetic_dataset, "two", check_keys=True) == []
    missing, corrupt, intact = (sidecar_path(synthetic_dataset, "two", s.name) for s in shards[:3])
    missing.unlink()
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    before = intact.stat().st_mtime_ns
    problems = verify_labels(synthetic_dataset, "two")
    assert (
        len(problems) == 2
        and any(missing.name in p and "missing" in p for p in problems)
        and any(corrupt.name in p for p in problems)
    )
    with pytest.raises(SystemExit, match="2 problem"):
        infer.run(infer_cfg(synthetic_dataset, labeler[0], name="two", verify_only=True))
    infer.run(infer_cfg(synthetic_dataset, labeler[0], name="two"))
    assert verify_labels(synthetic_dataset, "two", check_keys=True) == []
    assert intact.stat().st_mtime_ns == before
    np.testing.assert_allclose(
        read_sidecar(missing).text_emb,
        read_sidecar(sidecar_path(synthetic_dataset, "one", shards[0].name)).text_emb,
        atol=2e-3,
    )


@pytest.mark.slow
def test_train_on_two_ranks(synthetic_dataset, tmp_path):
    """Both ranks score against each other's texts (gathered with gradients) and average gradients."""
    out = tmp_path / "tiny2"
    cmd = torchrun_command(
        2,
        [
            "-m",
            "fgcmr.cli",
            "label",
            "train",
            f"--config={REPO / 'configs/labelers/tiny.yaml'}",
            f"--shards={synthetic_dataset}",
            f"--out={out}",
            "--max_steps=6",
            "--eval_every=3",
            "--max_eval_texts=100",
            "--threads=1",
            "--tensorboard=false",
        ],
    )
    done = run_following(cmd, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["steps"] == 6 and 0 <= metrics["auc"] <= 1
    load_labeler(out)


def test_another_labeler_redoes_sidecars_and_damaged_shards_are_blamed(labeler, synthetic_dataset, tmp_path):
    """Defect 5: another labeler's infer kept the old sidecars ("0 written, 15 kept") and --verify_only passed.
    Defect 9: --verify_only on a corrupt shard blamed the sidecars."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fgcmr.labels import labeler_identity, sidecars_current, write_head
    from fgcmr.train.data import check_sidecars
    from test_integrity import flip_header

    first = infer.run(infer_cfg(synthetic_dataset, labeler[0], name="ident"))
    other = tmp_path / "other"
    shutil.copytree(labeler[0], other)
    head = load_file(str(other / "head.safetensors"))
    save_file({k: v + 0.5 for k, v in head.items()}, str(other / "head.safetensors"))
    assert labeler_identity(other) != labeler_identity(labeler[0]) == first["labeler"]["identity"]
    assert sidecars_current(synthetic_dataset, "ident", labeler[0]) is None
    assert "another labeler" in sidecars_current(synthetic_dataset, "ident", other)
    with pytest.raises(SystemExit, match="problem"):
        infer.run(infer_cfg(synthetic_dataset, other, name="ident", verify_only=True))

    ds = open_dataset(synthetic_dataset)
    path = sidecar_path(synthetic_dataset, "ident", ds.shards("train")[0].name)
    before = path.read_bytes()
    second = infer.run(infer_cfg(synthetic_dataset, other, name="ident"))
    assert second["labeler"]["identity"] == labeler_identity(other) and path.read_bytes() != before  # all redone
    assert sidecars_current(synthetic_dataset, "ident", other) is None
    check_sidecars(ds, "train", "ident")
    w, c = read_head(synthetic_dataset, "ident")
    write_head(synthetic_dataset, "ident", w, c, labeler_identity(labeler[0]))  # a head from the first labeler
    with pytest.raises(SidecarError, match="written by another labeler than its head.npz"):
        check_sidecars(ds, "train", "ident")

    copy = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, copy, ignore=shutil.ignore_patterns(".parts"))
    write_head(copy, "ident", w, c, labeler_identity(other))
    infer.run(infer_cfg(copy, other, name="ident", verify_only=True))
    bad = open_dataset(copy).shards("test")[0]
    flip_header(bad)
    with pytest.raises(SystemExit, match=r"1 data shard\(s\) damaged \(not the labels\)"):
        infer.run(infer_cfg(copy, other, name="ident", verify_only=True))
