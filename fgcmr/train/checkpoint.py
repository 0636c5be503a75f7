"""DeepSpeed checkpoints with client state, per-rank RNG states, a ``latest`` pointer, and the last K kept.

Layout: ``<run>/checkpoints/step_NNNNNNNN/`` (DeepSpeed's files + ``rng_rank<r>.pt``) and
``<run>/checkpoints/latest`` (written by DeepSpeed after the tag is complete, so a kill mid-save
leaves ``latest`` on the previous, complete tag).
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fgcmr.config import ConfigError
from fgcmr.distributed import barrier
from fgcmr.io import atomic_open

log = logging.getLogger("fgcmr.train")
TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank writes its shard of the state; rank 0 then prunes old tags."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    with atomic_open(ckpt_dir / tag / f"rng_rank{_rank()}.pt") as f:
        torch.save(rng_state(), f)
    barrier()
    if _rank() == 0:
        prune(ckpt_dir, keep_last)
        log.info("checkpoint %s saved (step %d)", ckpt_dir / tag, step)
    return ckpt_dir / tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name))
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / "latest"
    return path.read_text().strip() if path.is_file() else None


def _check_world_size(tag_dir: Path, zero_stage: int) -> None:
    """ZeRO ≥ 1 partitions the optimizer state per rank: refuse another world size with a way out, up front."""
    saved = len(list(tag_dir.glob("rng_rank*.pt")))  # one per rank that wrote the tag
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved and saved != world and zero_stage > 0:
        raise ConfigError(
            f"checkpoint {tag_dir} was written by {saved} ranks under ZeRO stage {zero_stage}, whose optimizer state is "
            f"partitioned per rank; this job has {world}. Resume it with {saved} ranks (its exported weights, "
            "`fgcmr export --run=<run>`, load on any number)."
        )
    if saved and saved != world:
        log.warning("checkpoint %s was written by %d ranks, resuming on %d: the data order changes", tag_dir, saved, world)


def resume(engine, ckpt_dir: Path, resume: str) -> dict[str, Any] | None:
    """Load ``resume`` ("auto": the latest tag, None if there is none yet; else a tag directory)."""
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        if tag is None:
            log.info("no checkpoint in %s: starting from scratch", ckpt_dir)
            return None
        load_dir = ckpt_dir
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        load_dir, tag = path.parent, path.name
    _check_world_size(load_dir / tag, engine.zero_optimization_stage())
    loaded, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    rng = load_dir / tag / f"rng_rank{_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    log.info("resumed from %s at step %d", load_dir / tag, client.get("step", 0))
    return client
