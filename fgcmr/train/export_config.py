"""``fgcmr export``'s config and ``done`` check, torch-free: they read only the run's stamp and checkpoint tags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fgcmr.config import Validated
from fgcmr.run import Check, Fingerprint, check_stamp, fingerprint, read_stamp
from fgcmr.train.tags import latest_tag


@dataclasses.dataclass
class ExportConfig(Validated):
    run: str  # run dir of `fgcmr train`
    tag: str | None = None  # checkpoint tag (default: the newest complete one)
    out: str | None = None  # default: <run>/export


def export_dir(cfg: ExportConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.run) / "export"


def export_fingerprint(cfg: ExportConfig) -> Fingerprint:
    """The training run's fingerprint and the checkpoint tag exported (the newest complete one by default)."""
    run_dir = Path(cfg.run)
    train = read_stamp(run_dir) or {}
    tag = cfg.tag or latest_tag(run_dir / "checkpoints")
    return fingerprint("export", cfg, {"train": train.get("fingerprint"), "checkpoint": tag}, ("out",))


def done(cfg: ExportConfig) -> Check:
    return check_stamp(export_dir(cfg), export_fingerprint(cfg), "export")
