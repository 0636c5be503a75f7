"""The DeepSpeed engine: a ZeRO/precision JSON from ``configs/deepspeed/`` completed by ``runtime.optim`` settings.

The one training stack of fgcmr: the two-tower model (``train.loop``) and the siamese labeler
(``label.train``) join the process group, build their engine and its warm-up/cosine schedule here.
The optimizer is a plain ``torch.optim.AdamW`` passed in (``zero_allow_untested_optimizer``): DeepSpeed's
own Adam JIT-compiles ``fused_adam`` for minutes on CPU. The two-tower's parameter groups split towers
(lr × ``tower_lr_mult``) from the new heads, and weight-decayed matrices from biases, norms and the temperature.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import torch

from fgcmr.config import ConfigError, named_config_path
from fgcmr.distributed import DistEnv, collective_timeout, init
from fgcmr.model.partitioned import full_shape
from fgcmr.progress import quiet_prints
from fgcmr.runtime.optim import OptimConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def init_distributed(threads: int | None = None) -> DistEnv:
    """Join the process group, a group of one for a lone process (DeepSpeed then uses it as it is)."""
    import deepspeed

    env = init(threads, group_of_one=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if env.backend == "gloo":
        # DeepSpeed loads its CPU shared-memory all-reduce op here, JIT-compiling it on a fresh machine (30-170 s)
        # behind one machine-wide file lock in ~/.cache/torch_extensions (a job stuck holding it stalls every
        # other job's start). Only its inference all-reduce uses the op, which falls back to torch.distributed.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with quiet_prints():  # DeepSpeed prints that its shared-memory op "built successfully" on every start
        deepspeed.init_distributed(dist_backend=env.backend, timeout=collective_timeout())
    return env


def deepspeed_config(name: str, micro_batch: int, optim: OptimConfig) -> dict[str, Any]:
    cfg = json.loads(named_config_path(name, "deepspeed", ".json").read_text())
    cfg.pop("train_batch_size", None)
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=optim.grad_accum,
        gradient_clipping=optim.grad_clip,
        zero_allow_untested_optimizer=True,
        # torch's AdamW on offloaded (host) partitions on a CPU-only machine; on GPUs DeepSpeedCPUAdam (build_optimizer)
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=1 << 30,  # fgcmr logs itself
    )
    return cfg


def compute_dtype(ds_cfg: dict[str, Any]) -> torch.dtype:
    if ds_cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


class HasTowers(Protocol):
    """A model whose backbones may be pretrained (``TwoTower``, the cached trainer's projections)."""

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def tower_parameters(self) -> set[int]: ...


def param_groups(model: HasTowers, optim: OptimConfig) -> list[dict[str, Any]]:
    """Backbone parameters at ``tower_lr_mult`` × lr; weight decay on matrices only (not biases, norms, scales)."""
    towers = model.tower_parameters()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in towers, len(full_shape(p)) >= 2), []).append(p)
    return [
        {
            "params": ps,
            "lr": optim.lr * (optim.tower_lr_mult if tower else 1.0),
            "weight_decay": optim.weight_decay if decay else 0.0,
        }
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


def check_supported(ds_cfg: dict[str, Any]) -> None:
    """Refuse, with a way out, what DeepSpeed's accelerator here cannot run (fp16 on most CPUs)."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if compute_dtype(ds_cfg) == torch.float16 and not accel.is_fp16_supported():
        raise ConfigError(
            f"fp16 is not supported by DeepSpeed on this {accel.device_name()} device: "
            "use a *_bf16 or *_fp32 DeepSpeed config"
        )


def offloads_optimizer(ds_cfg: dict[str, Any]) -> bool:
    device = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def build_optimizer(groups: list[dict[str, Any]], ds_cfg: dict[str, Any], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over parameter ``groups``. With an offloaded optimizer (ZeRO-Offload) on an accelerator it is
    DeepSpeed's ``DeepSpeedCPUAdam`` (SIMD Adam on the host, a C++ op compiled once at first use), as
    DeepSpeed requires; on a CPU-only machine ``torch.optim.AdamW`` (offloading to the host changes
    nothing there, and it needs no compiled op)."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if offloads_optimizer(ds_cfg) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def build_engine(
    model: torch.nn.Module,
    ds_cfg: dict[str, Any],
    optim: OptimConfig,
    total_steps: int,
    groups: list[dict[str, Any]] | None = None,
) -> tuple[DeepSpeedEngine, torch.optim.lr_scheduler.LRScheduler]:
    """The engine and its schedule (``warmup_cosine``); ``groups``: the optimizer's parameter groups,
    by default ``param_groups``."""
    import deepspeed

    check_supported(ds_cfg)
    optimizer = build_optimizer(groups if groups is not None else param_groups(model, optim), ds_cfg, optim)
    factor = warmup_cosine(total_steps, optim.warmup_steps, optim.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    _cache_zero_grad(engine)
    return engine, scheduler


def _cache_zero_grad(engine: DeepSpeedEngine) -> None:
    """Without ZeRO or mixed precision DeepSpeed clears gradients by walking the whole module tree
    (``named_parameters``) every step, several ms on small models; a cached parameter list does the same."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    params = list(engine.module.parameters())

    def zero_grad() -> None:
        for p in params:
            p.grad = None

    engine.zero_grad = zero_grad
