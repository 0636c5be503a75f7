"""The run lifecycle without launching DeepSpeed: fingerprints, checkpoint bookkeeping, refusals, export
and eval completeness, permissions, leftovers, the requeue code through launchers (issue 11)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fgcmr.config import ConfigError
from fgcmr.io import clean_leftovers, sha256_file
from fgcmr.run import EXIT_REQUEUE, check_stamp, fingerprint, write_stamp
from fgcmr.train import checkpoint
from fgcmr.train.tags import latest_tag
from fgcmr.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def fake_tag(ckpt: Path, step: int, world: int = 2, complete: bool = True) -> Path:
    """A checkpoint tag as ``checkpoint.save`` leaves it (DeepSpeed's files faked by a few bytes each)."""
    tag = ckpt / checkpoint.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    for r in range(world):
        (tag / f"rng_rank{r}.pt").write_bytes(b"r" * 10)
    if complete:
        files = {p.name: p.stat().st_size for p in tag.iterdir()}
        digests = {p.name: sha256_file(p) for p in tag.iterdir()}
        info = {"step": step, "world_size": world, "files": files, "sha256": digests}
        (tag / checkpoint.COMPLETE).write_text(json.dumps(info))
    return tag


def test_fingerprint_names_what_changed(tmp_path):
    old = fingerprint("train", TrainConfig(shards="s", out="o", labels="l"), {"manifest": "aa"}, ("out", "resume"))
    write_stamp(tmp_path, old)
    assert check_stamp(tmp_path, old).done
    cfg = TrainConfig(shards="s", out="elsewhere", labels="l", resume="auto")  # execution fields do not count
    assert check_stamp(tmp_path, fingerprint("train", cfg, {"manifest": "aa"}, ("out", "resume"))).done
    cfg.loss.name, cfg.optim.lr = "clip", 0.01
    c = check_stamp(tmp_path, fingerprint("train", cfg, {"manifest": "aa"}, ("out", "resume")))
    assert (
        not c.done
        and c.changed
        and c.reason == "config changed (loss.name weighted_pairwise→clip, optim.lr 0.001→0.01)"
    )
    c = check_stamp(
        tmp_path,
        fingerprint("train", TrainConfig(shards="s", out="o", labels="l"), {"manifest": "bb"}, ("out", "resume")),
    )
    assert c.changed and c.reason == "inputs changed (manifest)"
    assert not check_stamp(tmp_path / "none", old).exists


def test_prune_keeps_latest_and_newer_sorted_by_step(tmp_path):
    """Defect 2: pruning kept the alphabetically last tags, deleting the ones just saved."""
    ckpt = tmp_path / "checkpoints"
    for step in (5, 10, 20, 30, 40):
        fake_tag(ckpt, step)
    fake_tag(ckpt, 3, complete=False)
    (ckpt / "latest").write_text("step_00000010")
    checkpoint.prune(ckpt, keep_last=1)
    assert [t.name for t in checkpoint.step_tags(ckpt)] == [
        "step_00000010",
        "step_00000020",
        "step_00000030",
        "step_00000040",
    ]
    (ckpt / "step_100000000").mkdir()  # a 9-digit step sorts first by name, last by step
    assert [t.name for t in checkpoint.step_tags(ckpt)][-1] == "step_00000040"  # (not a tag name: ignored)


def test_resume_finds_the_newest_complete_tag(tmp_path, caplog):
    """Defects 3, 8, 9: a missing ``latest``, one naming a tag without RNG states, a truncated file."""
    ckpt = tmp_path / "checkpoints"
    fake_tag(ckpt, 10)
    fake_tag(ckpt, 20)
    assert checkpoint.candidates(ckpt, "auto") == [ckpt / "step_00000020", ckpt / "step_00000010"]  # no latest at all
    assert "names nothing (missing); resuming from the newest complete tag step_00000020" in caplog.text
    third = fake_tag(ckpt, 30)
    (third / "rng_rank1.pt").unlink()  # killed before every rank wrote its RNG state
    (ckpt / "latest").write_text("step_00000030")
    assert checkpoint.candidates(ckpt, "latest")[0] == ckpt / "step_00000020"
    assert "rng_rank1.pt is damaged (missing bytes" in caplog.text and "names step_00000030" in caplog.text
    with open(ckpt / "step_00000020" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(50)
    assert checkpoint.problem(ckpt / "step_00000020") == (
        f"checkpoint file {ckpt / 'step_00000020' / 'mp_rank_00_model_states.pt'} is damaged (50 bytes, 100 written)"
    )
    assert checkpoint.candidates(ckpt, "auto") == [ckpt / "step_00000010"]
    assert latest_tag(ckpt) == "step_00000010"  # what export takes by default
    assert checkpoint.candidates(ckpt, "step_00000010") == [ckpt / "step_00000010"]  # a tag name
    with pytest.raises(FileNotFoundError, match="cannot resume from .*step_00000030 is incomplete|lacks"):
        (third / checkpoint.COMPLETE).unlink()
        checkpoint.candidates(ckpt, str(third))

    # A same-size byte flip inside a tensor: torch.load reads it silently, so resume compares sha256.
    fourth = fake_tag(ckpt, 40)
    flipped = fourth / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    data[40] ^= 0x01
    flipped.write_bytes(bytes(data))
    (ckpt / "latest").write_text("step_00000040")
    caplog.clear()
    assert checkpoint.problem(fourth) is None  # sizes alone cannot tell
    assert checkpoint.candidates(ckpt, "auto") == [ckpt / "step_00000010"]
    assert f"not resuming from checkpoint file {flipped} is damaged (same size, but not the sha256" in caplog.text
    assert "names step_00000040; resuming from the newest complete tag step_00000010" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"cannot resume from checkpoint file .* is damaged \(same size"):
        checkpoint.candidates(ckpt, "step_00000040")


def test_train_refuses_to_clobber_checkpoints(synthetic_dataset, tmp_path):
    """Defect 2: ``train --out=<run with checkpoints>`` without --resume trained from step 0 over it."""
    from fgcmr.train.state import guard, record, train_fingerprint

    from fgcmr.losses import LossConfig

    cfg = TrainConfig(shards=str(synthetic_dataset), out=str(tmp_path / "run"), loss=LossConfig(name="pairwise"))
    fp = train_fingerprint(cfg, strict=True)
    guard(cfg, fp)  # an empty run dir: fine
    fake_tag(tmp_path / "run" / "checkpoints", 40)
    with pytest.raises(
        ConfigError, match=r"already holds checkpoints \(newest step_00000040\): pass --resume=auto .* or a new --out"
    ):
        guard(cfg, fp)
    record(cfg, fp, 40, 40, complete=True)
    cfg.resume = "auto"
    guard(cfg, fp)  # continuing it as it was started
    cfg.optim.lr = 0.5
    with pytest.raises(ConfigError, match=r"another config or data \(optim.lr 0.001→0.5\)"):
        guard(cfg, train_fingerprint(cfg))


def test_train_checks_its_inputs_before_starting(synthetic_dataset, tmp_path):
    """Defect 9: a wrong --labels name or a missing dataset failed only after tokenizer training /
    DeepSpeed start-up."""
    from fgcmr.train.state import train_fingerprint

    with pytest.raises(FileNotFoundError, match="no labels 'typo' for .*run `fgcmr label infer` or fix --labels"):
        train_fingerprint(TrainConfig(shards=str(synthetic_dataset), out="x", labels="typo"), strict=True)
    with pytest.raises(FileNotFoundError, match="no dataset at .*nowhere"):
        train_fingerprint(TrainConfig(shards=str(tmp_path / "nowhere"), out="x", labels="l"), strict=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgcmr.cli",
            "train",
            f"--shards={synthetic_dataset}",
            f"--out={tmp_path / 'r'}",
            "--labels=typo",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,  # hang guard: importing the train stack took 99 s at load 20
    )
    assert done.returncode == 2 and "no labels 'typo'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def _tiny_model():
    from fgcmr.model import ImageTowerConfig, ModelConfig, TextTowerConfig, build_model

    cfg = ModelConfig(
        embed_dim=8,
        image=ImageTowerConfig(kind="feature", feature_dim=6),
        text=TextTowerConfig(kind="feature", feature_dim=5),
    )
    return build_model(cfg), cfg


def test_export_is_replaced_atomically_with_the_umask(tmp_path):
    """Defects 8 and 10: a kill between removing the old export and renaming the new left none; 0700/0600 files."""
    from fgcmr.model import load_export, save_export

    model, cfg = _tiny_model()
    old_umask = os.umask(0o022)
    try:
        out = save_export(tmp_path / "export", model, cfg)
    finally:
        os.umask(old_umask)
    assert out.is_symlink() and stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    first = (out / "model.safetensors").read_bytes()
    # A second export killed after writing its files, before switching: the first stays whole.
    code = textwrap.dedent(f"""
        import os, signal, torch
        import fgcmr.model.export as ex
        from fgcmr.model import ImageTowerConfig, ModelConfig, TextTowerConfig, build_model
        cfg = ModelConfig(embed_dim=8, image=ImageTowerConfig(kind="feature", feature_dim=6),
                          text=TextTowerConfig(kind="feature", feature_dim=5))
        ex._switch = lambda out, new: os.kill(os.getpid(), signal.SIGKILL)
        ex.save_export({str(tmp_path / "export")!r}, build_model(cfg), cfg)
    """)
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=600).returncode == -9
    assert (out / "model.safetensors").read_bytes() == first
    assert len(list(tmp_path.glob(".export.*"))) == 2  # the current version and the killed one's
    load_export(out)
    save_export(out, model, cfg)  # a rerun: same weights, leftovers gone
    assert (out / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.glob(".export.*")] == [os.readlink(out)]


def test_eval_is_done_only_with_its_stamp_and_report(synthetic_dataset, tmp_path):
    """Defect 8: an eval killed after metrics.json but before report.png counted as done."""
    from fgcmr.evaluate.config import EvalConfig, done, eval_fingerprint

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(f"train: {{shards: {synthetic_dataset}}}\n")
    (run / "export" / "model.safetensors").write_bytes(b"weights")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    cfg = EvalConfig(run=str(run))
    assert not done(cfg).done
    write_stamp(run / "eval", eval_fingerprint(cfg))
    assert not done(cfg).done  # no report.png
    (run / "eval" / "report.png").write_bytes(b"png")
    assert done(cfg).done
    (run / "export" / "model.safetensors").write_bytes(b"other weights")
    assert done(cfg).reason == "inputs changed (model)"
    cfg.split = "train"
    assert done(cfg).reason == "config changed (split test→train)"


def test_clean_leftovers(tmp_path):
    (tmp_path / ".metrics.json.abc123.tmp").write_text("half")
    (tmp_path / ".train-000000.tar.link.tmp").write_text("half")
    (tmp_path / "keep.json").write_text("{}")
    assert sorted(p.name for p in clean_leftovers(tmp_path, tmp_path / "absent")) == [
        ".metrics.json.abc123.tmp",
        ".train-000000.tar.link.tmp",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


RANK_75 = """
import json, os, sys
with open(os.environ["FGCMR_REQUEUE_FILE"], "w") as f:
    json.dump({"exit": 75}, f)
sys.exit(75)
"""


@pytest.mark.slow
def test_requeue_code_survives_torchrun_and_the_pipeline(tmp_path):
    """Defect 7: torchrun reports a rank's 75 as 1; the launchers give 75 back, and so does the pipeline's
    (``fgcmr.launch``), which the pipeline passes on."""
    from fgcmr.launch import local_command
    from fgcmr.pipeline import run_stage

    script = tmp_path / "rank.py"
    script.write_text(RANK_75)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    done = subprocess.run(
        [str(REPO / "launchers/torchrun.sh"), "-n", "1", str(script)],
        env={**env, "PYTHON": sys.executable},
        cwd=REPO,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode == EXIT_REQUEUE, done.stderr[-2000:]
    quiet = {**env, "FGCMR_REQUEUE_FILE": str(tmp_path / "requeue.json")}
    assert run_stage(local_command(2, [str(script)]), quiet) == (EXIT_REQUEUE, False)
    assert run_stage([sys.executable, "-c", "raise SystemExit(3)"], env) == (3, False)
