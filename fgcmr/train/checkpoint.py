"""DeepSpeed checkpoints with client state, per-rank RNG states, a ``latest`` pointer, and the last K kept.

Layout: ``<run>/checkpoints/step_NNNNNNNN/`` (DeepSpeed's files + ``rng_rank<r>.pt`` + ``complete.json``)
and ``<run>/checkpoints/latest``. A tag is *complete* once ``complete.json`` is there: rank 0 writes it
after every rank wrote its files, listing each file's size and sha256, then points ``latest`` at the tag.
A kill mid-save therefore leaves ``latest`` on the previous complete tag, and a truncated file is noticed
before DeepSpeed reads it. Resuming takes the newest complete tag (whatever ``latest`` says, saying so)
whose files still have their sha256 (``torch.load`` reads a flipped byte inside a tensor silently); one
that still fails to load is reported by path and the next older one is used.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from fgcmr.config import ConfigError
from fgcmr.distributed import barrier
from fgcmr.io import atomic_open, atomic_write_json, atomic_write_text, read_json, sha256_file
from fgcmr.train.tags import AUTO, COMPLETE, complete_tags, problem, step_tags, tag_for

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger("fgcmr.train")


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save(engine: DeepSpeedEngine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank writes its shard of the state; rank 0 then marks the tag complete and prunes."""
    tag = tag_for(step)
    if _rank() == 0 and (ckpt_dir / tag).exists():
        shutil.rmtree(ckpt_dir / tag)  # left by a killed save of this step: never mix two saves' files
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    with atomic_open(ckpt_dir / tag / f"rng_rank{_rank()}.pt") as f:
        torch.save(rng_state(), f)
    barrier()
    if _rank() == 0:
        paths = [p for p in sorted((ckpt_dir / tag).iterdir()) if p.is_file()]
        files = {p.name: p.stat().st_size for p in paths}
        digests = {p.name: sha256_file(p) for p in paths}
        atomic_write_json(
            ckpt_dir / tag / COMPLETE, {"step": step, "world_size": _world(), "files": files, "sha256": digests}
        )
        atomic_write_text(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
        log.info("checkpoint %s saved (step %d)", ckpt_dir / tag, step)
    barrier()
    return ckpt_dir / tag


class Checkpointer:
    """When training saves: every ``every`` optimizer steps (``due``), and on a stop and at the end (``save``),
    never twice for one step (a resumed run starts saved at its step)."""

    def __init__(self, engine: DeepSpeedEngine, ckpt_dir: Path, every: int, keep_last: int, saved_at: int | None):
        self.engine, self.dir, self.every, self.keep_last, self.saved_at = engine, ckpt_dir, every, keep_last, saved_at

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, client_state: dict[str, Any]) -> None:
        if self.saved_at != step:
            save(self.engine, self.dir, step, client_state, self.keep_last)
            self.saved_at = step


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete tags up to the one ``latest`` names; never touch newer ones."""
    pointer = ckpt_dir / "latest"
    latest = pointer.read_text().strip() if pointer.is_file() else None
    tags = step_tags(ckpt_dir)
    names = [t.name for t in tags]
    upto = tags[: names.index(latest) + 1] if latest in names else []
    complete = [t for t in upto if problem(t) is None]
    keep = set(complete[-keep_last:])
    for old in upto:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _check_world_size(tag_dir: Path, zero_stage: int) -> None:
    """ZeRO ≥ 1 partitions the optimizer state per rank: refuse another world size with a way out, up front."""
    saved = read_json(tag_dir / COMPLETE)["world_size"]
    world = _world()
    if saved != world and zero_stage > 0:
        raise ConfigError(
            f"checkpoint {tag_dir} was written by {saved} ranks under ZeRO stage {zero_stage}, "
            f"whose optimizer state is partitioned per rank; this job has {world}. "
            f"Resume it with {saved} ranks (its exported weights, "
            "`fgcmr export --run=<run>`, load on any number)."
        )
    if saved != world:
        log.warning(
            "checkpoint %s was written by %d ranks, resuming on %d: the data order changes", tag_dir, saved, world
        )


def candidates(ckpt_dir: Path, resume: str) -> list[Path]:
    """The tags to try, best first: for ``auto``/``latest`` every complete tag newest first; else the one named
    (a tag directory, or a tag name inside ``ckpt_dir``), which must be complete."""
    if resume in AUTO:
        good = complete_tags(ckpt_dir)[::-1]
        while good and (why := problem(good[0], contents=True)):  # every rank reads the same files: all agree
            log.warning("not resuming from %s", why)
            good.pop(0)
        for tag in step_tags(ckpt_dir)[::-1]:
            if good and tag == good[0]:
                break
            if problem(tag):
                log.warning("not resuming from %s", problem(tag))
        pointer = ckpt_dir / "latest"
        named = pointer.read_text().strip() if pointer.is_file() else None
        if good and named != good[0].name:
            log.warning(
                "%s names %s; resuming from the newest complete tag %s",
                pointer,
                named or "nothing (missing)",
                good[0].name,
            )
        return good
    path = Path(resume) if Path(resume).is_dir() or not (ckpt_dir / resume).is_dir() else ckpt_dir / resume
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path} (use --resume=auto for the run's newest)")
    why = problem(path, contents=True)
    if why:
        raise FileNotFoundError(f"cannot resume from {why}; use --resume=auto for the newest complete tag")
    return [path]


def resume(engine: DeepSpeedEngine, ckpt_dir: Path, resume: str) -> dict[str, Any] | None:
    """Load the first loadable of ``candidates`` (None: no complete tag yet, start from scratch)."""
    tags = candidates(ckpt_dir, resume)
    if not tags:
        log.info("no complete checkpoint in %s: starting from scratch", ckpt_dir)
        return None
    for i, tag_dir in enumerate(tags):
        _check_world_size(tag_dir, engine.zero_optimization_stage())
        client, failure = _load(engine, tag_dir)
        if client is not None:
            log.info("resumed from %s at step %d", tag_dir, client.get("step", 0))
            return client
        if i + 1 == len(tags):
            raise RuntimeError(f"no loadable checkpoint in {ckpt_dir}: {failure}")
        log.error("%s; falling back to %s", failure, tags[i + 1])
    return None


def _load(engine: DeepSpeedEngine, tag_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Every rank loads its part; all fail together if any rank's part is unreadable (so all fall back)."""
    client, failure = None, None
    try:
        loaded, client = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError("DeepSpeed found nothing to load")
        set_rng_state(torch.load(tag_dir / f"rng_rank{_rank()}.pt", weights_only=False))
    except Exception as e:  # noqa: BLE001 - any unreadable file: report it by path, try the previous tag
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        client, failure = None, f"checkpoint {tag_dir} is unreadable on rank {_rank()} ({type(e).__name__}: {first})"
    flag = torch.tensor([0 if failure is None else 1], device=engine.device)
    if dist.is_initialized() and _world() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        return None, failure or f"checkpoint {tag_dir} is unreadable on another rank"
    return client, None
