"""The DeepSpeed engine: a ZeRO/precision JSON from ``configs/deepspeed/`` completed by the train config.

The optimizer is a plain ``torch.optim.AdamW`` passed in (``zero_allow_untested_optimizer``): DeepSpeed's
own Adam JIT-compiles ``fused_adam`` for minutes on CPU. Parameter groups split towers (lr ×
``tower_lr_mult``) from the new heads, and weight-decayed matrices from biases, norms and the temperature.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from fgcmr.model.two_tower import TwoTower
from fgcmr.train.config import OptimConfig, named_config_path


def deepspeed_config(name: str, micro_batch: int, optim: OptimConfig) -> dict[str, Any]:
    cfg = json.loads(named_config_path(name, "deepspeed", ".json").read_text())
    cfg.pop("train_batch_size", None)
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=optim.grad_accum,
        gradient_clipping=optim.grad_clip,
        zero_allow_untested_optimizer=True,
        steps_per_print=1 << 30,  # fgcmr logs itself
    )
    return cfg


def compute_dtype(ds_cfg: dict[str, Any]) -> torch.dtype:
    if ds_cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def param_groups(model: TwoTower, optim: OptimConfig) -> list[dict[str, Any]]:
    towers = model.tower_parameters()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in towers, p.ndim >= 2), []).append(p)
    return [
        {"params": ps, "lr": optim.lr * (optim.tower_lr_mult if tower else 1.0), "weight_decay": optim.weight_decay if decay else 0.0}
        for (tower, decay), ps in sorted(groups.items())
    ]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """Learning-rate factor: linear warm-up, then cosine decay to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(model: TwoTower, ds_cfg: dict[str, Any], optim: OptimConfig, total_steps: int):
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    factor = warmup_cosine(total_steps, optim.warmup_steps, optim.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    _cache_zero_grad(engine)
    return engine, scheduler


def _cache_zero_grad(engine) -> None:
    """Without ZeRO or mixed precision DeepSpeed clears gradients by walking the whole module tree
    (``named_parameters``) every step, several ms on small models; a cached parameter list does the same."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    params = list(engine.module.parameters())

    def zero_grad() -> None:
        for p in params:
            p.grad = None

    engine.zero_grad = zero_grad
