"""The sharder's guarantees on the synthetic corpus: byte-identical output across reruns, worker
counts, Slurm-array tasks + merge and kill-and-resume; size limits; clear errors on bad usage."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fgcmr.config import ConfigError, load_config
from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.shard.config import Holdout
from fgcmr.shard.job import FAIL_AFTER_ENV, ShardConfig, run
from waits import run_following

REPO = Path(__file__).resolve().parents[1]
ITEMS, PER_SHARD = 150, 16


def shard(out: Path, **options) -> dict:
    cfg = ShardConfig(source="synthetic", out=str(out), items=ITEMS, seed=7, **options)
    cfg.data.max_items_per_shard = PER_SHARD
    return run(cfg)


def outputs(root: Path) -> dict[str, bytes]:
    """Every file a consumer reads (config.yaml records how the job ran, so it is left out)."""
    names = ["manifest.json", "sizes.json", "skipped.jsonl", *sorted(p.name for p in root.glob("*.tar"))]
    return {name: (root / name).read_bytes() for name in names}


def keys(root: Path, split: str) -> set[str]:
    return {s.key for path in open_dataset(root).shards(split) for s in iter_samples(path)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "synth"
    shard(out)
    return out


def test_reference_layout_and_manifest(reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert m["items_in"] == m["items_written"] == ITEMS and m["items_skipped"] == 0 and m["skipped"] == {}
    sizes = json.loads((reference / "sizes.json").read_text())
    for split, info in m["splits"].items():
        assert info["items"] == sum(s["items"] for s in info["shards"])
        for n, s in enumerate(info["shards"]):
            assert s["file"] == f"{split}-{n:06d}.tar" and sizes[s["file"]] == s["items"] <= PER_SHARD
            assert (reference / s["file"]).stat().st_size == s["bytes"]
    assert m["config"]["items"] == ITEMS and "workers" not in m["config"]
    assert "items: 150" in (reference / "config.yaml").read_text()
    with tarfile.open(reference / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert all(t.mtime == 0 and t.uid == 0 and t.gid == 0 and t.uname == "" and t.gname == "" for t in members)
    assert [t.name.split(".", 1)[1] for t in members[:3]] == ["jpg", "json", "txt"]


def test_rerun_is_byte_identical_and_keeps_shards(reference, tmp_path):
    shard(tmp_path / "synth")
    assert outputs(tmp_path / "synth") == outputs(reference)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "synth" / ".parts").glob("*.tar")}
    shard(tmp_path / "synth")  # complete: verified, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "synth" / ".parts").glob("*.tar")} == before
    assert outputs(tmp_path / "synth") == outputs(reference)


@pytest.mark.slow
def test_two_workers_equal_one(reference, tmp_path):
    shard(tmp_path / "synth", workers=2)
    assert outputs(tmp_path / "synth") == outputs(reference)


def test_array_tasks_then_merge_equal_single_run(reference, tmp_path):
    out = tmp_path / "synth"
    shard(out, task_index=1, num_tasks=3)
    shard(out, task_index=0, num_tasks=3)
    with pytest.raises(FileNotFoundError, match=r"tasks \[2\] of 3"):
        run(ShardConfig(out=str(out), merge=True))
    shard(out, task_index=2, num_tasks=3)
    manifest = run(ShardConfig(out=str(out), merge=True))
    assert manifest["items_written"] == ITEMS
    assert outputs(out) == outputs(reference)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(reference, tmp_path):
    out = tmp_path / "synth"
    cmd = [
        sys.executable,
        "-m",
        "fgcmr",
        "shard",
        "--source=synthetic",
        f"--out={out}",
        f"--items={ITEMS}",
        "--seed=7",
        f"--data.max_items_per_shard={PER_SHARD}",
    ]
    killed = subprocess.run(cmd, cwd=REPO, env={**os.environ, FAIL_AFTER_ENV: "4"}, capture_output=True, text=True)
    assert killed.returncode == 75, killed.stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    done = {p.name: p.stat().st_mtime_ns for p in (out / ".parts").glob("*-p*.tar")}
    assert len(done) == 4
    stale = out / ".parts" / ".train-c000009-p000.tar.x1y2.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"half a tar")
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"items_in {ITEMS} = items_written {ITEMS} + items_skipped 0" in resumed.stdout
    assert {
        n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in (out / ".parts").glob("*-p*.tar")) if n in done
    } == done
    assert outputs(out) == outputs(reference) and not stale.exists()


def test_corrupt_part_is_rewritten(reference, tmp_path):
    out = tmp_path / "synth"
    shard(out)
    part = next((out / ".parts").glob("test-c000001-p000.tar"))
    data = bytearray(part.read_bytes())
    data[600] ^= 0xFF
    part.unlink()  # a new inode: the final shard (a hard link to the old one) keeps its bytes
    part.write_bytes(bytes(data))
    shard(out)
    assert outputs(out) == outputs(reference)


def test_byte_limit_cuts_shards(tmp_path):
    cfg = ShardConfig(source="synthetic", out=str(tmp_path / "s"), items=40, seed=0)
    cfg.data.max_items_per_shard, cfg.data.max_bytes_per_shard = 1000, 20_000
    m = run(cfg)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 2 and sum(s["items"] for s in shards) == 32
    assert all(s["bytes"] <= -(-20_000 // tarfile.RECORDSIZE) * tarfile.RECORDSIZE for s in shards)
    assert sum(1 for p in m["splits"]["train"]["shards"] for _ in iter_samples(tmp_path / "s" / p["file"])) == 32


def test_max_side_reencodes(tmp_path):
    cfg = ShardConfig(source="synthetic", out=str(tmp_path / "s"), items=5, seed=0, image_size=96)
    cfg.data.max_image_side = 40
    run(cfg)
    ds = open_dataset(tmp_path / "s")
    sample = next(iter_samples(ds.shards("train")[0]))
    assert sample.meta["image_size"] == [40, 40] and sample.image_ext == "jpg"


def test_other_config_in_same_out_is_refused(tmp_path):
    shard(tmp_path / "synth")
    with pytest.raises(ConfigError, match="different config.*seed"):
        run(ShardConfig(source="synthetic", out=str(tmp_path / "synth"), items=ITEMS, seed=8))


def test_dotted_override_and_bad_values():
    cfg = load_config(ShardConfig, overrides={"data.max_items_per_shard": "500", "source": "csv", "root": "x"})
    assert cfg.data.max_items_per_shard == 500
    with pytest.raises(ConfigError, match="source='tvgraz' is not allowed"):
        load_config(ShardConfig, overrides={"source": "tvgraz"})
    with pytest.raises(ConfigError, match="root is required"):
        load_config(ShardConfig, overrides={"source": "wikipedia"})
    with pytest.raises(ConfigError, match="max_items_per_shard"):
        load_config(ShardConfig, overrides={"data.max_items_per_shard": 0})


@pytest.mark.slow
def test_cli_wrong_path_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fgcmr",
            "shard",
            "--source=wikipedia",
            "--root=/nonexistent/corpus",
            f"--out={tmp_path / 'x'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "/nonexistent/corpus does not exist" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "datasets").glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_configs_load(path):
    cfg = load_config(ShardConfig, path, section="shard")
    assert cfg.out.startswith("shards/") and (cfg.source == "synthetic" or cfg.root)


@pytest.mark.slow
def test_bench_shard_prints_one_json_object(tmp_path, capsys):
    from fgcmr.bench.shard import BenchShardConfig, run as bench

    result = bench(BenchShardConfig(items=40, image_size=48, memory_items=[100, 1000], out=str(tmp_path), json=True))
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and result["ratio"] > 0 and result["items_per_s"] > 0
    assert 20 < result["peak_mb_small"] and result["peak_mb_large"] < 1.25 * result["peak_mb_small"]  # streaming
    assert list(tmp_path.iterdir()) == []  # scratch space removed


def test_holdout_carves_a_stable_validation_split(reference, tmp_path):
    carved = tmp_path / "carved"
    m = shard(carved, holdout=Holdout(fraction=0.25, seed=3))
    train, val, original = keys(carved, "train"), keys(carved, "val"), keys(reference, "train")
    assert not train & val and train | val == original
    assert 0.1 < len(val) / len(original) < 0.4 and m["splits"]["val"]["items"] == len(val)
    again = shard(tmp_path / "again", holdout=Holdout(fraction=0.25, seed=3), workers=2)
    assert again["splits"]["val"] == m["splits"]["val"]
    shard(tmp_path / "other", holdout=Holdout(fraction=0.25, seed=4))
    assert keys(tmp_path / "other", "val") != val
    with pytest.raises(ValueError, match="holdout.fraction"):
        ShardConfig(holdout=Holdout(fraction=1.0)).validate()


def test_damaged_shard_is_named_and_a_rerun_repairs_it(reference, tmp_path):
    """The remedy the readers' error names: rerun the same `fgcmr shard` (the final shard is a hard link
    to its chunk part, so the damage is in both; the part fails its sha256 and is rewritten)."""
    from fgcmr.dataset import ShardError
    from test_integrity import flip_header

    out = tmp_path / "synth"
    shard(out)
    damaged = out / "train-000001.tar"
    flip_header(damaged)
    with pytest.raises(ShardError, match="train-000001.tar holds"):
        list(iter_samples(damaged))
    shard(out)
    assert outputs(out) == outputs(reference)


@pytest.mark.slow
def test_sigkill_of_the_process_group_at_several_moments_then_rerun_is_identical(reference, tmp_path):
    """Fault injection: SIGKILL to `fgcmr shard` and its workers once chunk parts exist, and again while
    the final shards are being linked; each rerun resumes, and the end result is byte-identical."""
    from waits import wait_until

    out = tmp_path / "synth"
    cmd = [
        sys.executable,
        "-m",
        "fgcmr",
        "shard",
        "--source=synthetic",
        f"--out={out}",
        f"--items={ITEMS}",
        "--seed=7",
        f"--data.max_items_per_shard={PER_SHARD}",
        "--workers=2",
    ]
    moments = [
        lambda: len(list((out / ".parts").glob("*-p*.tar"))) >= 3,  # mid-way through the chunks
        lambda: bool(list(out.glob("*.tar"))) or (out / "manifest.json").exists(),
    ]  # while placing the shards
    for moment in moments:
        job = subprocess.Popen(
            cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(lambda moment=moment, job=job: moment() or job.poll() is not None, [job], [out], early_exit_ok=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert 0 < len(list((out / ".parts").glob("*-p*.tar")))
    resumed = run_following(cmd, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outputs(out) == outputs(reference)
