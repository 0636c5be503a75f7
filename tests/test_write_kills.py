"""SIGKILL in the middle of a write (issue 11, fault injection): ``fgcmr embed``'s writer thread. The job is
killed where it is about to put a written file in place (``tests/kills.py``), then rerun in this process: the
rerun must give what an uninterrupted run gives, count nothing half-written as done, and leave no temporary
file behind. (Export and eval: ``test_pipeline.py``; the ablation's cache: ``test_train_cached.py``.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kills import kill_when_paused, paused_env, start
from test_use import make_export

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_embed_killed_in_its_writer_thread_then_rerun_is_identical(synthetic_dataset: Path, tmp_path: Path):
    from fgcmr.retrieval import embed

    export = make_export(synthetic_dataset, tmp_path / "export")
    out, ref = tmp_path / "emb", tmp_path / "ref"

    def cfg(where: Path) -> embed.EmbedConfig:
        return embed.EmbedConfig(export=str(export), shards=str(synthetic_dataset), out=str(where), splits=["test"])

    # Killed while the writer thread puts part 1 in place (its embeddings written, its captions table not yet):
    # part 0 is whole; part 1 has no record, so it does not count; there is no manifest.
    log, marker = tmp_path / "embed.log", tmp_path / "paused.json"
    cmd = [sys.executable, "-m", "fgcmr.cli", "embed", f"--export={export}", f"--shards={synthetic_dataset}"]
    cmd.append("--splits=test")  # 2 parts (shards of 40 and 8 samples)
    proc = start([*cmd, f"--out={out}"], log, paused_env(f"{out}/captions/captions_0001.parquet", marker), REPO)
    paused = kill_when_paused(proc, marker, [log, out])
    assert paused["thread"].startswith("embed-writer"), paused
    assert (out / "parts/part_0000.json").is_file() and (out / "img_emb/img_emb_0001.npy").is_file()
    assert not (out / "parts/part_0001.json").exists() and not (out / embed.MANIFEST).exists()
    assert list(out.glob("captions/.captions_0001.parquet.*.tmp"))
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*_0000.*")}
    assert len(first) == 6

    embed.run(cfg(out))  # the rerun keeps part 0 and redoes the rest
    embed.run(cfg(ref))  # uninterrupted
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert not list(out.rglob(".*.tmp"))
    got, want = files(out), files(ref)
    manifests = [json.loads(f.pop(embed.MANIFEST)) for f in (got, want)]
    assert got == want and len(got) == 6 * 2
    for m in manifests:  # where and how long: the rest is the same
        del m["seconds"], m["export"]
    assert manifests[0] == manifests[1]
