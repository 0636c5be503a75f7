"""``fgcmr bench memory``: per-rank memory of a few training steps, split into model state and activations,
next to what the ZeRO stage should cost per parameter.

Each rank (``nproc`` local processes, started here) measures, on CPU, its resident memory (RSS) after the
imports and the process group (``base``), after a few steps with no batch in flight (``steady``: weights,
gradients, optimizer state, allocator caches), and its peak RSS (``ru_maxrss``); on GPU the same with
``torch.cuda.memory_allocated`` / ``max_memory_allocated``. Model state = steady − base; activations
(plus transient buffers of the step) = peak − steady. The model is built the way ``fgcmr train`` builds
it (partitioned under ZeRO-3) and trained on synthetic in-memory batches of its input shapes.

Expected model state per parameter, Adam, N ranks (ZeRO paper, mixed precision: 2 B weights + 2 B
gradients + 12 B fp32 master, momentum, variance; fp32: 4 + 4 + 8):
stage 0: 16 | stage 1: 2 + 2 + 12/N (fp32 4 + 4 + 8/N) | stage 2: 2 + 14/N (fp32 4 + 12/N) | stage 3: 16/N.
Offloaded state lives in host memory, which on a CPU machine is the same RSS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
from typing import Any

import torch

from fgcmr.config import Validated
from fgcmr.bench.ranks import relaunch
from fgcmr.distributed import all_gather_objects, barrier


@dataclasses.dataclass
class BenchMemoryConfig(Validated):
    model: str = "tiny"  # configs/models/<name>.yaml
    deepspeed: str = "zero3_fp32"
    nproc: int = 1
    micro_batch: int = 2
    steps: int = 3
    grad_checkpointing: bool | None = None  # overrides both towers' setting when given
    json: bool = False

    def validate(self) -> None:
        if min(self.nproc, self.micro_batch, self.steps) < 1:
            raise ValueError("nproc, micro_batch and steps must be ≥ 1")


def expected_bytes_per_param(stage: int, mixed: bool, world: int) -> float:
    weights, grads, optim = (2, 2, 12) if mixed else (4, 4, 8)
    if stage == 0:
        return weights + grads + optim
    if stage == 1:
        return weights + grads + optim / world
    if stage == 2:
        return weights + (grads + optim) / world
    return (weights + grads + optim) / world


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(cfg: BenchMemoryConfig) -> dict[str, Any]:
    import gc

    from fgcmr.bench.host import machine
    from fgcmr.bench.train import synthetic_batches
    from fgcmr.losses import LossConfig, RetrievalLoss
    from fgcmr.model.partitioned import full_numel
    from fgcmr.train.config import OptimConfig, load_model_config
    from fgcmr.train.engine import build_engine, compute_dtype, deepspeed_config
    from fgcmr.train.loop import build_model_for, init_distributed
    from fgcmr.train.step import micro_step, to_device

    env = init_distributed()
    model_cfg = load_model_config(cfg.model)
    if model_cfg.text.kind == "transformers":
        model_cfg.text.config.setdefault("vocab_size", model_cfg.text.vocab_size)
    if cfg.grad_checkpointing is not None:
        model_cfg.image.grad_checkpointing = model_cfg.text.grad_checkpointing = cfg.grad_checkpointing
    optim = OptimConfig(warmup_steps=1)
    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.micro_batch, optim)
    dtype = compute_dtype(ds_cfg)
    batches = [to_device(b, env.device, dtype) for b in synthetic_batches(model_cfg, 2, cfg.micro_batch, seed=env.rank)]
    loss_fn = RetrievalLoss(LossConfig(name="pairwise"))
    gc.collect()
    barrier()
    base = _now(env.device)
    torch.manual_seed(0)
    engine, _ = build_engine(
        build_model_for(model_cfg, LossConfig(name="pairwise"), ds_cfg), ds_cfg, optim, total_steps=1 << 30
    )
    params = sum(full_numel(p) for p in engine.module.parameters())
    built = _now(env.device)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    for i in range(cfg.steps):
        micro_step(engine, loss_fn, batches[i % len(batches)])
    gc.collect()
    steady, peak = _now(env.device), _peak(env.device)
    stage = engine.zero_optimization_stage()
    mine = {
        "rank": env.rank,
        "base_mb": base / 2**20,
        "built_mb": built / 2**20,
        "steady_mb": steady / 2**20,
        "peak_mb": peak / 2**20,
        "model_state_mb": (steady - base) / 2**20,
        "activations_mb": max(0, peak - steady) / 2**20,
    }
    ranks = all_gather_objects(mine)
    return {
        "model": cfg.model,
        "deepspeed": cfg.deepspeed,
        "zero_stage": stage,
        "dtype": str(dtype).removeprefix("torch."),
        "nproc": env.world_size,
        "micro_batch": cfg.micro_batch,
        "steps": cfg.steps,
        "parameters": params,
        "grad_checkpointing": [model_cfg.image.grad_checkpointing, model_cfg.text.grad_checkpointing],
        "expected_bytes_per_param": expected_bytes_per_param(stage, dtype != torch.float32, env.world_size),
        "expected_model_state_mb": expected_bytes_per_param(stage, dtype != torch.float32, env.world_size)
        * params
        / 2**20,
        "memory_kind": "torch.cuda.memory_allocated" if env.device.type == "cuda" else "process RSS",
        "ranks": ranks,
        "machine": machine(),
    }


def table(r: dict[str, Any]) -> str:
    head = (
        f"{r['model']} ({r['parameters'] / 1e6:.1f} M parameters), {r['deepspeed']} ({r['dtype']}), "
        f"{r['nproc']} ranks × micro-batch {r['micro_batch']}, {r['steps']} steps, "
        f"grad checkpointing {r['grad_checkpointing']}; {r['memory_kind']}\n"
        f"expected model state {r['expected_bytes_per_param']:.2f} B/param = "
        f"{r['expected_model_state_mb']:.0f} MB per rank"
    )
    rows = [f"{'rank':>4} {'base MB':>8} {'model state MB':>15} {'activations MB':>15} {'peak MB':>8}"]
    rows += [
        f"{x['rank']:>4} {x['base_mb']:>8.0f} {x['model_state_mb']:>15.0f} "
        f"{x['activations_mb']:>15.0f} {x['peak_mb']:>8.0f}"
        for x in r["ranks"]
    ]
    return head + "\n" + "\n".join(rows)


def run(cfg: BenchMemoryConfig) -> dict[str, Any] | None:
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        code = relaunch("memory", cfg.nproc)
        if code:
            sys.exit(code)
        return None
    result = measure(cfg)
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(result) if cfg.json else table(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # the figures are out; skip teardown (gloo threads)
