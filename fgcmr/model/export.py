"""The exported model: ``model.safetensors`` + ``model_config.json`` (+ ``tokenizer/``, ``checksums.json``),
free of DeepSpeed.

``<dir>`` is a symlink to a hidden versioned sibling ``.<dir>.<id>/`` (see ``save_export``).
The config is rewritten to be self-contained: no pretrained-weight paths (the weights are in the
safetensors file), the text encoder's full architecture inline, the image preprocessing constants
(size, interpolation, crop, mean, std) inline, the tokenizer copied beside it. ``model_config.json``
is the ``ModelConfig`` plus one ``"fgcmr"`` block (version, embedding dim, max text length, tokenizer
dir, training provenance: run, checkpoint tag, step, data manifest sha256); the safetensors header
carries the same JSON, so the weights file alone still says what it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import torch

import fgcmr
from fgcmr.config import build, to_dict
from fgcmr.io import atomic_write_json, honour_umask, make_temp_dir, sha256_file
from fgcmr.model.config import ModelConfig, resolve_path
from fgcmr.model.inputs import Inputs, build_inputs
from fgcmr.model.streaming import write_safetensors
from fgcmr.model.two_tower import TwoTower, build_model

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "model_config.json", "tokenizer"
CHECKSUMS = "checksums.json"  # sha256 of every other file, for `fgcmr verify`
INFO = "fgcmr"  # model_config.json's block that is not part of ModelConfig


def standalone_config(model: TwoTower, cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every external reference replaced by what the export directory holds."""
    image = dataclasses.replace(cfg.image, pretrained=False, checkpoint=None)
    if image.kind == "timm":
        from fgcmr.model.inputs import image_data_config

        image.preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in image_data_config(cfg).items()}
    text = cfg.text
    if text.kind == "transformers":
        arch = _architecture(model.text_tower.encoder.config)
        text = dataclasses.replace(text, pretrained_dir=None, config=arch, tokenizer_dir=TOKENIZER)
    elif text.kind == "tfidf":
        text = dataclasses.replace(text, tokenizer_dir=TOKENIZER)
    return dataclasses.replace(cfg, image=image, text=text)


def _architecture(hf_config) -> dict:
    """A transformers config as ``text.config``: the architecture without where it came from."""
    drop = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")
    return {k: v for k, v in hf_config.to_dict().items() if k not in drop}


def skeleton(cfg: ModelConfig) -> TwoTower:
    """The model's structure on the meta device (names, shapes, configs; no memory, no weights read):
    what an export needs when its weights stream from elsewhere, e.g. a ZeRO-3 checkpoint."""
    image = dataclasses.replace(cfg.image, pretrained=False, checkpoint=None)
    text = cfg.text
    if text.kind == "transformers" and text.pretrained_dir:
        from transformers import AutoConfig

        arch = _architecture(AutoConfig.from_pretrained(resolve_path(text.pretrained_dir)))
        text = dataclasses.replace(text, pretrained_dir=None, config=arch)
    with torch.device("meta"):
        return build_model(dataclasses.replace(cfg, image=image, text=text))


def export_config(model: TwoTower, cfg: ModelConfig, provenance: dict | None = None) -> dict:
    """``model_config.json``'s content: the standalone ``ModelConfig`` and the ``"fgcmr"`` info block."""
    info = {
        "version": fgcmr.__version__,
        "embed_dim": cfg.embed_dim,
        "max_text_length": cfg.max_text_length,
        "tokenizer": TOKENIZER if cfg.text.kind in ("transformers", "tfidf") else None,
        "provenance": provenance or {},
    }
    return {**to_dict(standalone_config(model, cfg)), INFO: info}


def save_export(
    out_dir: str | Path,
    model: TwoTower,
    cfg: ModelConfig,
    state_dict: Mapping[str, Any] | None = None,
    provenance: dict | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the export atomically: a fresh hidden sibling directory ``.<name>.<id>``, then ``<name>`` (a
    relative symlink) switched to it in one rename, so there is never a moment without a whole export.
    ``state_dict``: the weights when not the model's own, possibly lazy (tensors read one at a time, see
    ``fgcmr.model.streaming``: a ZeRO-3 checkpoint streams into the file without being gathered whole);
    ``provenance``: where the weights come from (``run``, ``tag``, ``step``, ``data_manifest_sha256``…);
    ``extra(dir)`` adds files (e.g. a stamp) before the switch. Files get the umask's permissions."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_old_exports(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        config = export_config(model, cfg, provenance)
        write_safetensors(
            tmp / WEIGHTS,
            state,
            metadata={"format": "pt", "fgcmr_version": fgcmr.__version__, "model_config": json.dumps(config)},
        )
        if cfg.text.kind in ("transformers", "tfidf"):
            shutil.copytree(cfg.tokenizer_dir, tmp / TOKENIZER)
        atomic_write_json(tmp / CONFIG, config)
        if extra is not None:
            extra(tmp)
        atomic_write_json(
            tmp / CHECKSUMS,
            {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()},
        )
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


def weights_sha256(path: Path) -> str:
    """sha256 of a safetensors file's tensors (the bytes after its header): equal for equal weights wherever
    the run lived (the header's provenance names the run's and the data's paths)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def load_export(export_dir: str | Path, device: str | torch.device = "cpu") -> tuple[TwoTower, ModelConfig, Inputs]:
    """The exported model in eval mode, its config, and the eval-mode input pipeline."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    data = read_export_config(export_dir)
    data.pop(INFO, None)
    cfg = build(ModelConfig, data)
    if cfg.text.tokenizer_dir and not Path(cfg.text.tokenizer_dir).is_absolute():
        cfg.text.tokenizer_dir = str(export_dir / cfg.text.tokenizer_dir)
    model = build_model(cfg)
    model.load_state_dict(load_file(str(export_dir / WEIGHTS)), strict=True)
    return model.to(device).eval(), cfg, build_inputs(cfg, train=False)


def read_export_config(export_dir: str | Path) -> dict:
    """``model_config.json`` as written (the ``"fgcmr"`` block included; absent in exports before 0.1)."""
    path = Path(export_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir} is not an fgcmr export (no {CONFIG}); run `fgcmr export`")
    return json.loads(path.read_text())
