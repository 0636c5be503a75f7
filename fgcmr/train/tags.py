"""The checkpoint layout on disk, read without torch (the pipeline's done checks and ``export``'s default tag).

``<run>/checkpoints/step_NNNNNNNN/`` holds DeepSpeed's files, ``rng_rank<r>.pt`` and ``complete.json``
(written last by ``fgcmr.train.checkpoint.save``: each file's size and sha256).
"""

from __future__ import annotations

import re
from pathlib import Path

from fgcmr.io import read_json, sha256_file

TAG = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete.json"
AUTO = ("auto", "latest")  # --resume spellings for "the newest complete tag of this run" (open_clip says latest)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_tags(ckpt_dir: Path) -> list[Path]:
    """Every ``step_*`` directory, oldest step first (by step, not by name)."""
    if not ckpt_dir.is_dir():
        return []
    tags = (p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name))
    return sorted(tags, key=lambda p: int(TAG.match(p.name)[1]))


def problem(tag_dir: Path, contents: bool = False) -> str | None:
    """Why ``tag_dir`` is not a complete checkpoint (None when it is); ``contents``: also compare every file's
    sha256 with the one written (reads the whole tag: done for the tag a resume is about to load)."""
    if not (tag_dir / COMPLETE).is_file():
        return f"{tag_dir} is incomplete (no {COMPLETE}: its save was interrupted)"
    try:
        info = read_json(tag_dir / COMPLETE)
    except (OSError, ValueError) as e:
        return f"{tag_dir / COMPLETE} is unreadable ({e})"
    for name, size in info["files"].items():
        path = tag_dir / name
        if not path.is_file() or path.stat().st_size != size:
            actual = path.stat().st_size if path.is_file() else "missing"
            return f"checkpoint file {path} is damaged ({actual} bytes, {size} written)"
    missing = [f"rng_rank{r}.pt" for r in range(info["world_size"]) if f"rng_rank{r}.pt" not in info["files"]]
    if missing:
        return f"{tag_dir} lacks {', '.join(missing)}"
    for name, digest in info.get("sha256", {}).items() if contents else ():
        if sha256_file(tag_dir / name) != digest:
            return f"checkpoint file {tag_dir / name} is damaged (same size, but not the sha256 written)"
    return None


def complete_tags(ckpt_dir: Path) -> list[Path]:
    return [t for t in step_tags(ckpt_dir) if problem(t) is None]


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete tag's name (what export and resume use by default)."""
    tags = complete_tags(ckpt_dir)
    return tags[-1].name if tags else None
