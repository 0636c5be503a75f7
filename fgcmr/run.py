"""The run directory seam: where each stage's output lives, and how a stage tells that its output is done.

A stage's output is *done* only when it is complete **and** was made from the same inputs and the same
resolved stage config as asked now. Each stage's writer records a ``Fingerprint`` (its config minus the
options that never change what it writes, plus the hashes of its inputs) with its output, written last;
its ``done`` check (next to the writer, listed in ``fgcmr.stages``) compares. ``Check.reason`` says why
a stage is not done, e.g. ``config changed (loss.name clip→pairwise)``, so nothing old is ever shown as new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from fgcmr.config import to_dict
from fgcmr.io import atomic_write_json, read_json, sha256_file

STAMP = "fgcmr-stage.json"  # a stage's fingerprint, beside its output
LABELER = "labeler"  # the labeler's (and its label sidecars') name in a pipeline's data dir
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a job stopped by a signal after checkpointing; rerun it to continue
REQUEUE_FILE_ENV = "FGCMR_REQUEUE_FILE"  # where a rank records that it exited EXIT_REQUEUE (torchrun loses the code)


class Layout:
    """Where every stage's output lives in a pipeline's output (and data) directory."""

    def __init__(self, out: Path, data_dir: Path):
        self.out, self.data_dir = out, data_dir
        self.shards = data_dir / "shards"
        self.tokenizer = data_dir / "tokenizer"
        self.labeler = data_dir / LABELER
        self.run = out / "run"
        self.export = self.run / "export"
        self.eval = self.run / "eval"
        self.experiment = out / "experiment.yaml"


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a stage's output was made from: its config (plain data) and its inputs' hashes."""

    stage: str
    config: dict
    inputs: dict[str, str | None]

    @property
    def digest(self) -> str:
        text = json.dumps({"config": self.config, "inputs": self.inputs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def changes(self, recorded: dict) -> list[str]:
        """What differs from a recorded stamp, as ``key old→new`` (config) and ``<input> input`` entries."""
        out = diff(recorded.get("config") or {}, self.config)
        old_inputs = recorded.get("inputs") or {}
        out += [
            f"{k} input" for k in sorted(set(old_inputs) | set(self.inputs)) if old_inputs.get(k) != self.inputs.get(k)
        ]
        return out


def fingerprint(stage: str, cfg: Any, inputs: dict[str, str | None], exclude: Iterable[str] = ()) -> Fingerprint:
    """``cfg`` (a config object) without the ``exclude`` fields (dotted names allowed), with ``inputs``."""
    config = to_dict(cfg)
    for name in exclude:
        node, *path = config, *name.split(".")
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return Fingerprint(stage, config, inputs)


@dataclasses.dataclass(frozen=True)
class Check:
    """A stage's answer to "is your output done?"; ``reason`` says why not."""

    done: bool
    reason: str = ""
    exists: bool = False  # some output is there (so redoing replaces it)

    @property
    def changed(self) -> bool:
        return self.exists and self.reason.startswith(("config changed", "inputs changed"))


DONE = Check(True, exists=True)


def write_stamp(directory: Path, fp: Fingerprint, **extra: Any) -> None:
    """Record ``fp`` beside a stage's output; call it after the output is complete."""
    atomic_write_json(
        directory / STAMP,
        {"stage": fp.stage, "fingerprint": fp.digest, "config": fp.config, "inputs": fp.inputs, **extra},
    )


def clear_stamp(directory: Path) -> None:
    """A writer about to replace a stage's output calls this first: a half-replaced output never counts as done."""
    (directory / STAMP).unlink(missing_ok=True)


def read_stamp(directory: Path) -> dict | None:
    path = directory / STAMP
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None  # a damaged stamp: the output is not trusted


def check_stamp(directory: Path, fp: Fingerprint, what: str = "output") -> Check:
    """Done when ``directory``'s stamp records ``fp``; else why not (missing, or what changed)."""
    stamp = read_stamp(directory)
    if stamp is None:
        exists = directory.is_dir() and any(directory.iterdir())
        return Check(False, f"no finished {what} in {directory}", exists=exists)
    if stamp.get("fingerprint") == fp.digest:
        return DONE
    changes = fp.changes(stamp)
    config = [c for c in changes if not c.endswith(" input")]
    inputs = [c.removesuffix(" input") for c in changes if c.endswith(" input")]
    if config:
        return Check(False, f"config changed ({', '.join(config)})", exists=True)
    return Check(False, f"inputs changed ({', '.join(inputs) or 'unknown'})", exists=True)


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted ``key old→new`` for every leaf that differs between two plain-data trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str) for d in diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} {_short(old)}→{_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def file_hash(path: Path) -> str | None:
    """sha256 of a file, None when it is absent (an input that does not exist yet)."""
    return sha256_file(path) if path.is_file() else None


def record_requeue(step: int) -> None:
    """Leave the requeue code where a launcher that loses exit codes (torchrun) finds it."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if path:
        atomic_write_json(Path(path), {"exit": EXIT_REQUEUE, "step": step})
