"""One rank of ``tests/test_zero.py``'s single 2-process launch: every shipped DeepSpeed config trained a
few steps, ZeRO-3 construction under ``zero.Init`` (partition sizes counted as parameters appear),
pretrained weights loaded partitioned vs whole, and a ZeRO-3 resume. Rank 0 writes ``<out>/result.json``.

fp16 on a CPU whose DeepSpeed accelerator reports no fp16 support (most: it asks oneDNN) is trained with
that check forced on, and the result says so: DeepSpeed's fp16 machinery (loss scaling, fp16 ZeRO
partitions) then runs on torch's CPU fp16 kernels, which tests fgcmr's dtype plumbing end to end.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import sys
import weakref
from pathlib import Path

import torch

from fgcmr.bench.train import synthetic_batches
from fgcmr.losses import LossConfig, RetrievalLoss
from fgcmr.model import ModelConfig, save_export
from fgcmr.model.partitioned import full_numel, is_partitioned, local_numel
from fgcmr.text import ensure_tokenizer
from fgcmr.train import checkpoint
from fgcmr.config import CONFIGS
from fgcmr.runtime.optim import OptimConfig
from fgcmr.train.config import load_model_config
from fgcmr.runtime.engine import build_engine, compute_dtype, deepspeed_config
from fgcmr.train.loop import build_model_for, init_distributed
from fgcmr.train.step import micro_step, to_device

STEPS, MICRO = 3, 8
VOCAB = 120


def tiny_config(tok_dir: Path) -> ModelConfig:
    cfg = load_model_config("tiny")
    text = dataclasses.replace(cfg.text, tokenizer_dir=str(tok_dir), config={**cfg.text.config, "vocab_size": VOCAB})
    return dataclasses.replace(cfg, text=text)


def train(
    model_cfg: ModelConfig, ds_name: str, steps: int, rank: int, engine=None, start: int = 0, **build
) -> tuple[list[float], object]:
    ds_cfg = deepspeed_config(ds_name, MICRO, OptimConfig(warmup_steps=1, lr=2e-3))
    if engine is None:
        torch.manual_seed(0)
        engine, _ = build_engine(
            build_model_for(model_cfg, LossConfig(name="pairwise"), ds_cfg, **build),
            ds_cfg,
            OptimConfig(warmup_steps=1, lr=2e-3),
            total_steps=100,
        )
    loss_fn = RetrievalLoss(LossConfig(name="pairwise"))
    dtype = compute_dtype(ds_cfg)
    batches = synthetic_batches(model_cfg, start + steps, MICRO, seed=100 + rank)[start:]
    losses = []
    for b in batches:
        out, _ = micro_step(engine, loss_fn, to_device(b, engine.device, dtype))
        losses.append(float(out.loss))
    return losses, engine


def param_dtypes(engine) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in engine.module.parameters()})


def every_config(model_cfg: ModelConfig, rank: int, init: Path) -> dict:
    """3 steps per config, all from the same fp32 weights (``init``, an export) so that only precision and
    partitioning differ (random init under zero.Init, in bf16, draws other numbers)."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    fp16_native = accel.is_fp16_supported()
    out = {"fp16_native": fp16_native}
    for path in sorted((CONFIGS / "deepspeed").glob("*.json")):
        print("config", path.stem, flush=True)
        forced = "fp16" in path.stem and not fp16_native
        if forced:
            accel.is_fp16_supported = lambda: True
        try:
            losses, engine = train(model_cfg, path.stem, STEPS, rank, init_from=str(init))
            out[path.stem] = {
                "losses": losses,
                "param_dtypes": param_dtypes(engine),
                "zero_stage": engine.zero_optimization_stage(),
                "forced_fp16": forced,
            }
            del engine
        finally:
            if forced:
                del accel.is_fp16_supported  # back to the class's own check
    return out


def construction_peak(model_cfg: ModelConfig, ds_name: str | None) -> dict:
    """Elements held by this rank summed over every parameter so far, each time a parameter is registered."""
    ds_cfg = deepspeed_config(ds_name, MICRO, OptimConfig()) if ds_name else None
    seen: list[weakref.ref] = []
    peak = [0]

    def hook(module, name, param):
        seen.append(weakref.ref(param))
        held = sum(local_numel(p) for r in seen if (p := r()) is not None)
        peak[0] = max(peak[0], held)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        torch.manual_seed(0)
        model = build_model_for(model_cfg, LossConfig(name="pairwise"), ds_cfg)
    finally:
        handle.remove()
    params = list(model.parameters())
    largest_layer = max(sum(full_numel(p) for p in m.parameters(recurse=False)) for m in model.modules())
    return {
        "peak": peak[0],
        "total": sum(full_numel(p) for p in params),
        "after": sum(local_numel(p) for p in params),
        "all_partitioned": all(is_partitioned(p) for p in params),
        "largest_layer": largest_layer,
        "tower_classes": [type(model.image_tower.backbone).__name__, type(model.text_tower.encoder).__name__],
    }


def full_state(model) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def pretrained_equal(model_cfg: ModelConfig, work: Path, rank: int) -> dict:
    """Weights files written from one model (timm backbone under other names in a .pt, the text encoder as a
    from_pretrained dir, the whole model as an fgcmr export), loaded whole and loaded ZeRO-3-partitioned."""
    from safetensors.torch import save_file

    from fgcmr.distributed import barrier

    torch.manual_seed(1)
    source = build_model_for(model_cfg, LossConfig(name="pairwise"))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # far from any init, so a weight left unloaded shows
    if rank == 0:
        backbone = source.image_tower.backbone.state_dict()
        other_names = {
            f"layer{i}" + (".num_batches_tracked" if k.endswith("num_batches_tracked") else ""): v
            for i, (k, v) in enumerate(backbone.items())
        }
        torch.save(other_names, work / "backbone.pt")  # loads in order
        save_file({k: v.contiguous() for k, v in backbone.items()}, str(work / "backbone.safetensors"))  # loads by name
        source.text_tower.encoder.save_pretrained(work / "encoder")
        save_export(work / "export", source, model_cfg)
    barrier()
    results = {}
    ds_cfg = deepspeed_config("zero3_fp32", MICRO, OptimConfig())
    for ext in ("pt", "safetensors"):
        cfg = dataclasses.replace(
            model_cfg,
            image=dataclasses.replace(model_cfg.image, checkpoint=str(work / f"backbone.{ext}")),
            text=dataclasses.replace(model_cfg.text, pretrained_dir=str(work / "encoder"), config={}),
        )
        whole = build_model_for(cfg, LossConfig(name="pairwise")).state_dict()
        parted = full_state(build_model_for(cfg, LossConfig(name="pairwise"), ds_cfg))
        towers = [k for k in whole if k.startswith(("image_tower.", "text_tower."))]
        results[f"towers_{ext}"] = {
            "tensors": len(towers),
            "equal": all(torch.equal(whole[k].float(), parted[k]) for k in towers),
            "equal_source": all(torch.equal(source.state_dict()[k].float(), parted[k]) for k in towers),
        }
    parted = full_state(build_model_for(model_cfg, LossConfig(name="pairwise"), ds_cfg, init_from=str(work / "export")))
    ref = source.state_dict()
    results["export"] = {"tensors": len(ref), "equal": all(torch.equal(ref[k].float(), parted[k]) for k in ref)}
    return results


def resume_exact(model_cfg: ModelConfig, work: Path, rank: int) -> dict:
    """4 ZeRO-3 steps straight vs 2 steps, a checkpoint, a fresh process state (new engine), 2 more."""
    straight, _ = train(model_cfg, "zero3_fp32", 4, rank)
    first, engine = train(model_cfg, "zero3_fp32", 2, rank)
    checkpoint.save(engine, work / "ckpt", 2, {"step": 2, "samples_seen": 0}, keep_last=1)
    del engine
    torch.manual_seed(123)  # whatever the new process would have drawn: resume restores the RNG
    ds_cfg = deepspeed_config("zero3_fp32", MICRO, OptimConfig(warmup_steps=1, lr=2e-3))
    engine, _ = build_engine(
        build_model_for(model_cfg, LossConfig(name="pairwise"), ds_cfg),
        ds_cfg,
        OptimConfig(warmup_steps=1, lr=2e-3),
        total_steps=100,
    )
    client = checkpoint.resume(engine, work / "ckpt", "auto")
    rest, _ = train(model_cfg, "zero3_fp32", 2, rank, engine=engine, start=2)
    return {"straight": straight, "resumed": first + rest, "client_step": client["step"]}


def main() -> None:
    out = Path(sys.argv[1])
    faulthandler.dump_traceback_later(
        float(sys.argv[2]) if len(sys.argv) > 2 else 1200, exit=True
    )  # a hang shows its stacks
    env = init_distributed()
    work = out / "work"
    if env.is_main:
        work.mkdir(parents=True, exist_ok=True)
        ensure_tokenizer(["a red circle", "two blue squares", "green stars"] * 10, work / "tok", VOCAB, min_frequency=0)
    from fgcmr.distributed import barrier

    barrier()
    model_cfg = tiny_config(work / "tok")
    result = {"world_size": env.world_size}
    if env.is_main:
        torch.manual_seed(0)
        save_export(work / "init", build_model_for(model_cfg, LossConfig(name="pairwise")), model_cfg)
    barrier()
    result["configs"] = every_config(model_cfg, env.rank, work / "init")
    result["construction"] = {
        "zero3": construction_peak(model_cfg, "zero3_bf16"),
        "whole": construction_peak(model_cfg, None),
    }
    result["pretrained"] = pretrained_equal(model_cfg, work, env.rank)
    result["resume"] = resume_exact(model_cfg, work, env.rank)
    if env.is_main:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    barrier()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads): the figures are out


if __name__ == "__main__":
    main()
