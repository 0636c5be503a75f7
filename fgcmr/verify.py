"""``fgcmr verify <dir>``: check what fgcmr wrote against its own records, file by file.

- a dataset (``manifest.json`` with splits): each shard's size, sha256 and sample count (read through
  ``fgcmr.dataset.iter_records``, which also catches a corrupt tar header that ``tarfile`` would take for
  the end of the archive), then every label directory under ``labels/`` (``fgcmr.labels.verify_labels``);
- a label directory (``labels/<name>/``): its sidecars against their manifest and data shards;
- an export (``model_config.json``, or a run directory's ``export/``): the config parses, the safetensors
  header is intact and accounts for the file's size, and files match ``checksums.json`` where recorded.

Any directory below the given one holding these (a ``fgcmr pipeline --out`` folder) is checked too.
Prints one line per file or problem; the command exits 1 when anything is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

from fgcmr.dataset import DatasetInfo, iter_records, open_dataset
from fgcmr.io import CorruptFileError, read_json, sha256_file
from fgcmr.labels import verify_labels
from fgcmr.model.export import CHECKSUMS, CONFIG, WEIGHTS

SKIP_DIRS = {"checkpoints", "tensorboard", "labels", "tokenizer", "encoder", "slurm"}


@dataclasses.dataclass(frozen=True)
class FileReport:
    path: Path
    problem: str | None = None  # None: intact

    def line(self) -> str:
        return f"ok   {self.path}" if self.problem is None else f"BAD  {self.path}: {self.problem}"


def verify_shards(ds: DatasetInfo) -> list[FileReport]:
    """Every shard of every split: present, size and sha256 as recorded, and the recorded number of samples."""
    reports = []
    for split in ds.split_names:
        for info in ds.shard_infos(split):
            path = ds.root / info.file
            reports.append(FileReport(path, _shard_problem(path, info)))
    return reports


def _shard_problem(path: Path, info) -> str | None:
    if not path.is_file():
        return "missing; rerun `fgcmr shard` with the same options and --out"
    size = path.stat().st_size
    if size != info.bytes:
        return f"{size} bytes, the manifest says {info.bytes}; re-shard (rerun `fgcmr shard` with the same --out)"
    if sha256_file(path) != info.sha256:
        count = sum(1 for _ in iter_records(path, fields=(), on_corrupt="skip", checked=False))
        return (
            f"sha256 differs from the manifest (damaged or changed; {count} of {info.items} samples readable); "
            "re-shard (rerun `fgcmr shard` with the same --out)"
        )
    return None


def verify_export(export: Path) -> list[FileReport]:
    reports = []
    try:
        json.loads((export / CONFIG).read_text())
        reports.append(FileReport(export / CONFIG))
    except (OSError, ValueError) as e:
        reports.append(FileReport(export / CONFIG, f"unreadable ({e}); rerun `fgcmr export`"))
    weights = export / WEIGHTS
    reports.append(FileReport(weights, _safetensors_problem(weights)))
    recorded = export / CHECKSUMS
    if recorded.is_file():
        try:
            sums = read_json(recorded)
        except CorruptFileError as e:
            return reports + [FileReport(recorded, str(e))]
        for rel, want in sorted(sums.items()):
            f = export / rel
            if not f.is_file():
                reports.append(FileReport(f, "missing; rerun `fgcmr export`"))
            elif sha256_file(f) != want:
                reports.append(FileReport(f, f"sha256 differs from {CHECKSUMS}; rerun `fgcmr export`"))
    return reports


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header of tensor offsets, then the data."""
    if not path.is_file():
        return "missing; rerun `fgcmr export`"
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, MemoryError, OverflowError) as e:
        return f"header unreadable ({type(e).__name__}); rerun `fgcmr export`"
    if path.stat().st_size != 8 + n + end:
        return f"{path.stat().st_size} bytes, its header accounts for {8 + n + end} (truncated?); rerun `fgcmr export`"
    return None


def verify_dataset(root: Path) -> list[FileReport]:
    try:
        ds = open_dataset(root)
    except CorruptFileError as e:
        return [FileReport(root / "manifest.json", str(e))]
    reports = verify_shards(ds)
    for label_dir in sorted(p for p in (root / "labels").glob("*") if (p / "manifest.json").is_file()):
        reports += verify_label_dir(label_dir)
    return reports


def verify_label_dir(label_dir: Path) -> list[FileReport]:
    problems = verify_labels(label_dir.parent.parent, label_dir.name)
    return [FileReport(label_dir, p) for p in problems] or [FileReport(label_dir / "*.npz")]


def _kind(d: Path) -> str | None:
    if (d / CONFIG).is_file() and (d / WEIGHTS).exists():
        return "export"
    manifest = d / "manifest.json"
    if manifest.is_file():
        return "labels" if d.parent.name == "labels" else "dataset"
    return None


def find_targets(root: Path, depth: int = 3) -> list[tuple[str, Path]]:
    """(kind, dir) for ``root`` and the directories below it (datasets, label dirs, exports)."""
    kind = _kind(root)
    if kind is not None:
        return [(kind, root)]
    if depth == 0:
        return []
    found = []
    for sub in sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SKIP_DIRS
    ):
        found += find_targets(sub, depth - 1)
    return found


def verify(path: str | Path) -> list[FileReport]:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    targets = find_targets(root)
    if not targets:
        raise FileNotFoundError(
            f"nothing fgcmr wrote under {root} (no dataset manifest.json, label manifest or export)"
        )
    check = {"dataset": verify_dataset, "labels": verify_label_dir, "export": verify_export}
    return [r for kind, d in targets for r in check[kind](d)]
