"""``fgcmr export``: a (ZeRO) checkpoint of any world size → ``<run>/export/`` that loads without DeepSpeed."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from fgcmr.config import build, read_yaml
from fgcmr.io import sha256_file
from fgcmr.model import ModelConfig, build_model, save_export
from fgcmr.progress import setup_logging
from fgcmr.run import Check, Fingerprint, check_stamp, fingerprint, read_stamp, write_stamp
from fgcmr.train.checkpoint import latest_tag, problem

log = logging.getLogger("fgcmr.export")


@dataclasses.dataclass
class ExportConfig:
    run: str = ""  # run dir of `fgcmr train`
    tag: str | None = None  # checkpoint tag (default: the newest complete one)
    out: str | None = None  # default: <run>/export

    def validate(self) -> None:
        if not self.run:
            raise ValueError("--run=<run dir> is required")


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights: merged from ZeRO partitions (stages 1–3, any world size), else the stage-0 module."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {tag_dir}")
    if any("optim_states" in p.name for p in tag_dir.iterdir()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


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
    state = consolidated_state_dict(ckpt_dir, tag)
    model = build_model(model_cfg)
    model.load_state_dict(state, strict=True)
    out = save_export(
        export_dir(cfg),
        model,
        model_cfg,
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
