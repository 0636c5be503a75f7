"""``fgcmr export``: a (ZeRO) checkpoint of any world size → ``<run>/export/`` that loads without DeepSpeed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fgcmr.config import build, read_yaml
from fgcmr.io import sha256_file
from fgcmr.model import ModelConfig, save_export
from fgcmr.model.export import skeleton
from fgcmr.progress import setup_logging
from fgcmr.run import write_stamp
from fgcmr.train.export_config import ExportConfig, export_dir, export_fingerprint
from fgcmr.train.tags import problem

log = logging.getLogger("fgcmr.export")


def checkpoint_tensors(ckpt_dir: Path, tag: str) -> Mapping[str, Any]:
    """The full weights of a checkpoint (any world size), read lazily: ZeRO-3 parameters are gathered from
    every rank's memory-mapped fp32 partition one at a time when read (``.contiguous()``), so an export
    streams them (``fgcmr.model.streaming``) and never holds the whole model. ZeRO-1/2 checkpoints are
    merged whole by DeepSpeed; stage 0 is the module's own state, memory-mapped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {tag_dir}")
    if any("optim_states" in p.name for p in tag_dir.iterdir()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True)
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)
    return state["module"]


def check_tensors(model: torch.nn.Module, tensors: Mapping[str, Any], source: Path) -> None:
    """The checkpoint has exactly the model's tensors, in its shapes (``load_state_dict(strict=True)``'s
    check, on a skeleton: no weights are read)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    wrong = [k for k in want if tuple(tensors[k].shape) != want[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, the model needs {want[k]}")


def run(cfg: ExportConfig) -> Path:
    setup_logging()
    run_dir = Path(cfg.run)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no config.yaml); run `fgcmr train` first")
    run_cfg = read_yaml(run_dir / "config.yaml")
    model_cfg = build(ModelConfig, run_cfg["model"], "model")
    ckpt_dir = run_dir / "checkpoints"
    fp = export_fingerprint(cfg)
    tag = fp.inputs["checkpoint"]
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    why = problem(ckpt_dir / tag, contents=True)
    if why:
        raise FileNotFoundError(f"cannot export: {why}")
    state = checkpoint_tensors(ckpt_dir, tag)
    model = skeleton(model_cfg)
    check_tensors(model, state, ckpt_dir / tag)
    out = save_export(
        export_dir(cfg),
        model,
        model_cfg,
        state_dict=state,
        provenance=provenance(run_dir, run_cfg, tag),
        extra=lambda d: write_stamp(d, fp),
    )
    log.info("exported %s (%s, %d tensors) → %s", run_dir, tag, len(state), out)
    return out


def provenance(run_dir: Path, run_cfg: dict, tag: str) -> dict:
    """Where an export's weights come from: run, checkpoint tag and step, training data and its manifest hash."""
    train = run_cfg.get("train") or {}
    shards = train.get("shards")
    manifest = Path(shards) / "manifest.json" if shards else None
    step = tag.rpartition("_")[2]
    return {
        "run": str(run_dir.resolve()),
        "tag": tag,
        "step": int(step) if step.isdigit() else None,
        "data": shards,
        "data_manifest_sha256": sha256_file(manifest) if manifest and manifest.is_file() else None,
        "loss": (train.get("loss") or {}).get("name"),
        "seed": train.get("seed"),
    }
