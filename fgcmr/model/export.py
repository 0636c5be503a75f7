"""The exported model: ``model.safetensors`` + ``model_config.json`` (+ ``tokenizer/``, ``checksums.json``), free of DeepSpeed.

``<dir>`` is a symlink to a hidden versioned sibling ``.<dir>.<id>/`` (see ``save_export``).
The config is rewritten to be self-contained: no pretrained-weight paths (the weights are in the
safetensors file), the text encoder's full architecture inline, the tokenizer copied beside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from fgcmr.config import build, to_dict
from fgcmr.io import atomic_write_json, honour_umask, make_temp_dir, sha256_file
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


def save_export(out_dir: str | Path, model: TwoTower, cfg: ModelConfig,
                state_dict: dict[str, torch.Tensor] | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write the export atomically: a fresh hidden sibling directory ``.<name>.<id>``, then ``<name>`` (a
    relative symlink) switched to it in one rename, so there is never a moment without a whole export.
    ``extra(dir)`` adds files (e.g. a stamp) before the switch. Files get the umask's permissions."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_old_exports(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        save_file(state, str(tmp / WEIGHTS))
        if cfg.text.kind == "transformers":
            shutil.copytree(cfg.tokenizer_dir, tmp / TOKENIZER)
        atomic_write_json(tmp / CONFIG, to_dict(standalone_config(model, cfg)))
        if extra is not None:
            extra(tmp)
        atomic_write_json(tmp / CHECKSUMS, {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()})
        honour_umask(tmp)
        _switch(out_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clean_old_exports(out_dir)
    return out_dir


def _switch(out_dir: Path, new: Path) -> None:
    link = out_dir.with_name(f".{out_dir.name}.link.tmp")
    link.unlink(missing_ok=True)
    os.symlink(new.name, link)
    if out_dir.is_dir() and not out_dir.is_symlink():  # a plain directory from an older fgcmr: move it aside first
        out_dir.rename(make_temp_dir(out_dir.parent, f".{out_dir.name}.") / "old")
    os.replace(link, out_dir)


def clean_old_exports(out_dir: Path) -> None:
    """Remove the hidden versions ``<name>`` no longer points at (left by earlier or killed exports)."""
    current = os.readlink(out_dir) if out_dir.is_symlink() else None
    for path in out_dir.parent.glob(f".{out_dir.name}.*"):
        if path.name != current:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
