"""What fgcmr reads is checked against what it wrote: byte flips and truncation of shards, sidecars and
manifests end in an error naming the file (or a counted skip when asked for), and `fgcmr verify` finds them."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fgcmr import cli
from fgcmr.dataset import ShardError, iter_samples, open_dataset
from fgcmr.io import CorruptFileError
from fgcmr.labels import labels_dir, read_sidecar, sidecar_path, verify_labels, write_head, write_sidecar
from fgcmr.verify import verify


@pytest.fixture
def dataset(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """A private copy (real files, not the hard links to .parts) that a test may damage."""
    out = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, out, ignore=shutil.ignore_patterns(".parts", "labels"))
    return out


def flip_header(shard: Path) -> int:
    """Overwrite 4 bytes of a tar header in the middle of the shard; returns the members before it."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    at = len(members) // 2
    data = bytearray(shard.read_bytes())
    data[members[at].offset + 100 : members[at].offset + 104] = b"\xff\xff\xff\xff"  # the mode field: checksum fails
    shard.write_bytes(bytes(data))
    return at


def test_corrupt_header_mid_shard_is_an_error_naming_it_or_a_counted_skip(dataset: Path, caplog, capsys):
    """Defect 4: tarfile took the bad header for the end of the archive; the reader silently lost the rest."""
    ds = open_dataset(dataset)
    shard = ds.shards("train")[1]
    flip_header(shard)
    expected = ds.shard_infos("train")[1].items
    with pytest.raises(
        ShardError, match=rf"{shard.name} holds \d+ samples, the manifest says {expected}.*fgcmr verify"
    ):
        list(iter_samples(shard))
    with caplog.at_level("WARNING"):
        kept = list(iter_samples(shard, on_corrupt="skip"))
    assert 0 < len(kept) < expected
    assert any(
        "skipped the rest of data shard" in r.getMessage() and shard.name in r.getMessage() for r in caplog.records
    )

    reports = verify(dataset)
    bad = [r for r in reports if r.problem]
    assert [r.path.name for r in bad] == [shard.name] and "sha256 differs" in bad[0].problem
    assert f"{len(kept)} of {expected} samples readable" in bad[0].problem
    with pytest.raises(SystemExit) as exit_:
        cli.verify(str(dataset))
    assert exit_.value.code == 1 and f"BAD  {shard}" in capsys.readouterr().out


def test_truncated_shard_names_the_file(dataset: Path):
    """Defect 4: a truncated shard crashed label and train with `KeyError: 'texts'` naming no file."""
    shard = open_dataset(dataset).shards("train")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 700])
    with pytest.raises(ShardError, match=rf"{shard.name} is \d+ bytes, the manifest says"):
        next(iter_samples(shard))
    assert "bytes, the manifest says" in next(r.problem for r in verify(dataset) if r.problem)


def test_invalid_manifest_is_a_clear_error(dataset: Path, capsys):
    """Defect 9: a bare JSONDecodeError before."""
    manifest = dataset / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(
        CorruptFileError, match=r"dataset manifest damaged: .*manifest.json is not valid JSON.*fgcmr shard"
    ):
        open_dataset(dataset)
    with pytest.raises(CorruptFileError, match="dataset manifest damaged"):  # readers look their shard up in it
        list(iter_samples(dataset / "train-000000.tar"))
    with pytest.raises(SystemExit):
        cli.verify(str(dataset))
    assert f"BAD  {manifest}" in capsys.readouterr().out


def test_damaged_sidecars_and_label_manifest_are_named(dataset: Path):
    ds = open_dataset(dataset)
    rng = np.random.default_rng(0)
    sums = {}
    for split in ds.split_names:
        for shard in ds.shards(split):
            samples = list(iter_samples(shard))
            counts = np.array([len(s.texts) for s in samples])
            path = sidecar_path(dataset, "lab", shard.name)
            sums[path.name] = {
                "sha256": write_sidecar(
                    path,
                    [s.key for s in samples],
                    rng.random((counts.sum(), 8)),
                    np.concatenate([[0], np.cumsum(counts)]),
                    rng.random((len(samples), 8)),
                    labeler="abc",
                ),
                "items": len(samples),
            }
    write_head(dataset, "lab", np.ones(8), 0.0, "abc")
    manifest = labels_dir(dataset, "lab") / "manifest.json"
    manifest.write_text('{"labeler": {"identity": "abc"}, "sidecars": ' + __import__("json").dumps(sums) + "}")
    assert verify_labels(dataset, "lab", check_keys=True) == []
    assert not [r for r in verify(dataset) if r.problem]

    flipped, cut = (sidecar_path(dataset, "lab", s.name) for s in ds.shards("train")[:2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(CorruptFileError, match=rf"label sidecar unreadable: .*{cut.name}"):
        read_sidecar(cut)
    problems = verify_labels(dataset, "lab")
    assert len(problems) == 2 and any(flipped.name in p for p in problems) and any(cut.name in p for p in problems)
    assert sorted(r.problem is not None for r in verify(dataset)).count(True) == 2

    manifest.write_text("{")
    assert verify_labels(dataset, "lab") == [
        f"label manifest damaged: {manifest} is not valid JSON (Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1)); it was truncated or edited: "
        "rerun the stage that wrote it, or restore it"
    ]


def test_verify_checks_an_export(tmp_path: Path):
    from fgcmr.model import ModelConfig, build_model, save_export
    from fgcmr.model.config import ImageTowerConfig, TextTowerConfig

    cfg = ModelConfig(
        image=ImageTowerConfig(kind="feature", feature_dim=12, hidden_dim=16),
        text=TextTowerConfig(kind="feature", feature_dim=5, hidden_dim=16),
        embed_dim=8,
    )
    export = save_export(tmp_path / "run" / "export", build_model(cfg), cfg)
    assert (export / "checksums.json").is_file() and not [r for r in verify(tmp_path / "run") if r.problem]
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    problems = [r.problem for r in verify(tmp_path / "run") if r.problem]
    assert len(problems) == 2 and "truncated" in problems[0] and "sha256 differs" in problems[1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing fgcmr wrote"):
        verify(tmp_path / "empty")
