"""The exported model: ``model.safetensors`` + ``model_config.json`` (+ ``tokenizer/``, ``checksums.json``), free of DeepSpeed.

The config is rewritten to be self-contained: no pretrained-weight paths (the weights are in the
safetensors file), the text encoder's full architecture inline, the tokenizer copied beside it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch

from fgcmr.config import build, to_dict
from fgcmr.io import atomic_write_json, sha256_file
from fgcmr.model.config import ModelConfig
from fgcmr.model.inputs import Inputs, build_inputs
from fgcmr.model.two_tower import TwoTower, build_model

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "model_config.json", "tokenizer"
CHECKSUMS = "checksums.json"  # sha256 of every other file, for `fgcmr verify`


def standalone_config(model: TwoTower, cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every external reference replaced by what the export directory holds."""
    image = dataclasses.replace(cfg.image, pretrained=False, checkpoint=None)
    text = cfg.text
    if text.kind == "transformers":
        arch = model.text_tower.encoder.config.to_dict()
        arch = {k: v for k, v in arch.items() if k not in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")}
        text = dataclasses.replace(text, pretrained_dir=None, config=arch, tokenizer_dir=TOKENIZER)
    return dataclasses.replace(cfg, image=image, text=text)


def save_export(out_dir: str | Path, model: TwoTower, cfg: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the export atomically (a temporary sibling directory renamed into place)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_file(state, str(tmp / WEIGHTS))
        if cfg.text.kind == "transformers":
            shutil.copytree(cfg.tokenizer_dir, tmp / TOKENIZER)
        atomic_write_json(tmp / CONFIG, to_dict(standalone_config(model, cfg)))
        atomic_write_json(tmp / CHECKSUMS, {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> tuple[TwoTower, ModelConfig, Inputs]:
    """The exported model in eval mode, its config, and the eval-mode input pipeline."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    if not (export_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{export_dir} is not an fgcmr export (no {CONFIG}); run `fgcmr export`")
    cfg = build(ModelConfig, json.loads((export_dir / CONFIG).read_text()))
    if cfg.text.tokenizer_dir and not Path(cfg.text.tokenizer_dir).is_absolute():
        cfg.text.tokenizer_dir = str(export_dir / cfg.text.tokenizer_dir)
    model = build_model(cfg)
    model.load_state_dict(load_file(str(export_dir / WEIGHTS)), strict=True)
    return model.to(device).eval(), cfg, build_inputs(cfg, train=False)
