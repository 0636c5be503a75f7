"""What a training run directory says about itself: its fingerprint, whether it is done, and whether
this ``fgcmr train`` may write into it.

``<run>/fgcmr-stage.json`` records the fingerprint (``fgcmr.run``) when training starts (``complete:
false``) and again when it ends (``complete: true``, the step reached). Checkpoints are expensive, so a
run directory holding them is never trained over by accident: without ``--resume`` that is refused, and
``--resume=auto`` continues a run only with the config and data it was started with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fgcmr.config import ConfigError, named_config_path, to_dict
from fgcmr.run import Check, Fingerprint, check_stamp, file_hash, fingerprint, read_stamp, write_stamp
from fgcmr.train.config import TrainConfig, load_model_config
from fgcmr.train.tags import AUTO, step_tags

# Options that change how a run is watched or where it is kept, never the model it trains.
EXECUTION_FIELDS = ("out", "resume", "checkpoint_every", "keep_last", "log_every", "hist_every")


def inputs(cfg: TrainConfig, strict: bool = False) -> dict[str, str | None]:
    """Hashes of what training reads; ``strict``: a missing dataset or labels is a usage error, said now
    (before any tokenizer training or DeepSpeed start-up)."""
    shards = Path(cfg.shards)
    manifest = file_hash(shards / "manifest.json")
    if strict and manifest is None:
        raise FileNotFoundError(f"no dataset at {shards} (no manifest.json): run `fgcmr shard --out={shards}` first")
    found = {"manifest": manifest}
    if cfg.loss.needs_labels:
        from fgcmr.labels import labels_dir

        head = labels_dir(shards, cfg.labels) / "head.npz"
        found["labels"] = file_hash(head)
        if strict and found["labels"] is None:
            have = sorted(p.parent.name for p in (shards / "labels").glob("*/head.npz"))
            raise FileNotFoundError(
                f"no labels {cfg.labels!r} for {shards} ({head} missing; labels there: "
                f"{', '.join(have) or 'none'}): run `fgcmr label infer` or fix --labels"
            )
    model = json.dumps(to_dict(load_model_config(cfg.model, cfg.model_overrides)), sort_keys=True)
    found["model"] = hashlib.sha256(model.encode()).hexdigest()
    found["deepspeed"] = file_hash(named_config_path(cfg.deepspeed, "deepspeed", ".json"))
    return found


def train_fingerprint(cfg: TrainConfig, strict: bool = False) -> Fingerprint:
    return fingerprint("train", cfg, inputs(cfg, strict), EXECUTION_FIELDS)


def done(cfg: TrainConfig) -> Check:
    """Done when the run finished every step with this config and data."""
    run = Path(cfg.out)
    check = check_stamp(run, train_fingerprint(cfg), "training run")
    if not check.done:
        return check
    stamp = read_stamp(run) or {}
    if not stamp.get("complete"):
        return Check(
            False, f"training stopped at step {stamp.get('step', '?')} of {stamp.get('total_steps', '?')}", exists=True
        )
    return check


def guard(cfg: TrainConfig, fp: Fingerprint) -> None:
    """Refuse to train over a run directory that holds checkpoints, unless resuming it as it was started."""
    run = Path(cfg.out)
    tags = step_tags(run / "checkpoints")
    if not tags:
        return
    if cfg.resume is None:
        raise ConfigError(
            f"{run} already holds checkpoints (newest {tags[-1].name}): pass --resume=auto to continue "
            "that run, or a new --out to start another"
        )
    stamp = read_stamp(run)
    if cfg.resume in AUTO and stamp is not None and stamp.get("fingerprint") != fp.digest:
        raise ConfigError(
            f"{run} was trained with another config or data ({', '.join(fp.changes(stamp))}); "
            "--resume=auto continues a run only as it was started: use a new --out, or "
            "--resume=<tag dir> to start from those weights with this config"
        )


def record(cfg: TrainConfig, fp: Fingerprint, step: int, total_steps: int, complete: bool) -> None:
    write_stamp(Path(cfg.out), fp, step=step, total_steps=total_steps, complete=complete)
