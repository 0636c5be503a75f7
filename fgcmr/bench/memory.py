"""``fgcmr bench memory``: per-rank memory of a few training steps, split into model state, activations and
the process baseline, next to what the ZeRO stage should cost per parameter.

Two views, measured on every rank:

* **Tensor census** (exact, free of allocator noise): the bytes of the tensors the rank holds after the
  steps, each storage counted once: parameters (the local ZeRO-3 partitions, or the whole tensors),
  gradients (``.grad`` and DeepSpeed's gradient partitions/buckets), optimizer state (fp32 master
  partitions and Adam's moments), and other tensors DeepSpeed keeps (communication buckets). Model state =
  parameters + gradients + optimizer state: this is what ZeRO partitions, and what the 1/N goal is about.
  Activations = the bytes autograd saves for backward during one forward (``saved_tensors_hooks``; weights
  excluded), which is what gradient checkpointing cuts.
* **Resident memory** (what the OS sees, on CPU): RSS after the imports and the process group
  (``baseline``: torch, DeepSpeed, the batches), RSS growth over engine construction and the steps
  (``model state RSS``: the census plus allocator caches and DeepSpeed's fixed-size buffers), and the peak
  over the steps above that (``activations RSS``: saved activations, gathered ZeRO-3 layers, transient
  buffers). The peak is the kernel's high-water mark (``VmHWM``), reset before the steps
  (``/proc/self/clear_refs``). The ranks run with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed large
  tensors go back to the OS instead of staying in RSS. On GPU: ``memory_allocated`` / ``max_memory_allocated``.

Expected model state per parameter, Adam, N ranks (ZeRO paper, mixed precision: 2 B weights + 2 B
gradients + 12 B fp32 master, momentum, variance; fp32: 4 + 4 + 8):
stage 0: 16 | stage 1: 2 + 2 + 12/N (fp32 4 + 4 + 8/N) | stage 2: 2 + 14/N (fp32 4 + 12/N) | stage 3: 16/N.
Offloaded state lives in host memory, which on a CPU machine is the same RSS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fgcmr.config import Validated
from fgcmr.bench.ranks import relaunch
from fgcmr.distributed import all_gather_objects, barrier

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

MB = 2**20
OUT_ENV = "FGCMR_BENCH_MEMORY_OUT"  # rank 0 writes its JSON result there when a parent collects several runs
# Allocations above this size are mmap'ed by glibc and returned to the OS when freed (the dynamic threshold
# would keep freed activations in the heap, where they look like model state).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}


@dataclasses.dataclass
class BenchMemoryConfig(Validated):
    model: str = "tiny"  # configs/models/<name>.yaml
    deepspeed: str = "zero3_fp32"  # configs/deepspeed/<name>.json or a path to one
    nproc: int | list[int] = 1  # ranks; a list (--nproc=1,2) runs each and reports the model-state ratio last/first
    micro_batch: int = 2  # samples per rank and step
    steps: int = 3  # measured steps
    grad_checkpointing: bool | None = None  # overrides both towers' setting when given
    json: bool = False  # print one JSON object instead of the table

    def validate(self) -> None:
        if min(self.counts() + [self.micro_batch, self.steps]) < 1:
            raise ValueError("nproc, micro_batch and steps must be ≥ 1")

    def counts(self) -> list[int]:
        return list(self.nproc) if isinstance(self.nproc, list) else [self.nproc]


def expected_bytes_per_param(stage: int, mixed: bool, world: int) -> float:
    weights, grads, optim = (2, 2, 12) if mixed else (4, 4, 8)
    if stage == 0:
        return weights + grads + optim
    if stage == 1:
        return weights + grads + optim / world
    if stage == 2:
        return weights + (grads + optim) / world
    return (weights + grads + optim) / world


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``, ``RssAnon``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)


def _now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _status("VmRSS")


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")


class _Census:
    """Bytes of distinct tensor storages by category; a storage is counted once, in the first category
    that claims it."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], str] = {}
        self.bytes: dict[str, int] = {}

    def add(self, t: Any, category: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (t.device.type, storage.data_ptr())
        if storage.nbytes() == 0 or key in self.seen:
            return
        self.seen[key] = category
        self.bytes[category] = self.bytes.get(category, 0) + storage.nbytes()


def _tensors(value: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth - 1)
    elif depth and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth - 1)


def tensor_census(engine: DeepSpeedEngine, exclude: list[torch.Tensor]) -> dict[str, int]:
    """What the rank's tensors hold, in bytes: ``params``, ``grads``, ``optimizer``, ``other`` (every other
    live tensor: DeepSpeed's buckets and buffers); ``exclude`` (the input batches) is not counted."""
    from fgcmr.model.partitioned import is_partitioned

    c = _Census()
    for t in exclude:
        c.add(t, "excluded")
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    for p in engine.module.parameters():
        c.add(p.ds_tensor if is_partitioned(p) else p, "params")
    for name, value in vars(wrapper).items():  # low-precision flat partitions alias the parameters
        if ("fp16" in name or "bit16" in name) and "grad" not in name:
            for t in _tensors(value):
                c.add(t, "params")
    for p in engine.module.parameters():
        c.add(p.grad, "grads")
    for group in inner.param_groups:
        for p in group["params"]:
            c.add(p, "optimizer")  # the fp32 master partitions (the parameters themselves at stage 0 fp32)
            c.add(p.grad, "grads")
    for state in inner.state.values():
        for t in _tensors(state):
            c.add(t, "optimizer")
    if wrapper is not inner:
        for name, value in vars(wrapper).items():
            for t in _tensors(value):
                c.add(t, "grads" if "grad" in name.lower() else "other")
    with warnings.catch_warnings():  # isinstance() on some live objects (torch.distributed's) warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                c.add(obj, "other")
    c.bytes.pop("excluded", None)
    return {k: c.bytes.get(k, 0) for k in ("params", "grads", "optimizer", "other")}


@contextlib.contextmanager
def saved_activations() -> Iterator[dict[str, int]]:
    """Bytes of the distinct tensors autograd saves for backward inside the block (parameters excluded)."""
    out = {"bytes": 0}
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                out["bytes"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def measure(cfg: BenchMemoryConfig) -> dict[str, Any]:
    import gc

    from fgcmr.bench.host import machine
    from fgcmr.bench.train import synthetic_batches
    from fgcmr.losses import LossConfig, RetrievalLoss
    from fgcmr.model.partitioned import full_numel
    from fgcmr.runtime.optim import OptimConfig
    from fgcmr.train.config import load_model_config
    from fgcmr.runtime.engine import build_engine, compute_dtype, deepspeed_config
    from fgcmr.train.loop import build_model_for, init_distributed
    from fgcmr.train.step import micro_step, to_device

    env = init_distributed()
    model_cfg = load_model_config(cfg.model)
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
    _reset_peak(env.device)
    torch.manual_seed(0)
    engine, _ = build_engine(
        build_model_for(model_cfg, LossConfig(name="pairwise"), ds_cfg), ds_cfg, optim, total_steps=1 << 30
    )
    params = sum(full_numel(p) for p in engine.module.parameters())
    gc.collect()
    built, build_peak = _now(env.device), _peak(env.device)
    barrier()
    _reset_peak(env.device)
    step_s = []
    for i in range(cfg.steps - 1):
        t0 = time.perf_counter()
        micro_step(engine, loss_fn, batches[i % len(batches)])
        step_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    batch = batches[(cfg.steps - 1) % len(batches)]
    with saved_activations() as saved:  # the last step by hand, to count what its forward saves for backward
        image_emb, text_emb, logit_scale = engine(batch["image"], batch["text"])
        loss = loss_fn(image_emb, text_emb, batch, logit_scale).loss
    engine.backward(loss)
    engine.step()
    step_s.append(time.perf_counter() - t0)
    del image_emb, text_emb, logit_scale, loss
    gc.collect()
    steady, peak = _now(env.device), _peak(env.device)
    census = tensor_census(engine, [t for b in batches for t in _tensors(b)])
    stage = engine.zero_optimization_stage()
    held = census["params"] + census["grads"] + census["optimizer"]
    mine = {
        "rank": env.rank,
        "baseline_mb": base / MB,
        "built_mb": (built - base) / MB,
        "build_peak_mb": build_peak / MB,
        "steady_mb": steady / MB,
        "peak_mb": peak / MB,
        "model_state_rss_mb": (steady - base) / MB,
        "activations_rss_mb": max(0, peak - steady) / MB,
        "census_mb": {k: v / MB for k, v in census.items()},
        "model_state_mb": held / MB,
        "model_state_bytes_per_param": held / params,
        "saved_activations_mb": saved["bytes"] / MB,
        "step_s": step_s,
    }
    ranks = all_gather_objects(mine)
    expected = expected_bytes_per_param(stage, dtype != torch.float32, env.world_size)
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
        "expected_bytes_per_param": expected,
        "expected_model_state_mb": expected * params / MB,
        "memory_kind": "torch.cuda.memory_allocated" if env.device.type == "cuda" else "process RSS (VmRSS/VmHWM)",
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
    rows = [
        f"{'rank':>4} {'params':>7} {'grads':>7} {'optim':>7} {'= state':>8} {'B/param':>7} {'DS bufs':>7} "
        f"{'saved act':>9} | {'baseline':>8} {'state RSS':>9} {'act RSS':>8} {'peak':>7}  (MB)"
    ]
    for x in r["ranks"]:
        c = x["census_mb"]
        rows.append(
            f"{x['rank']:>4} {c['params']:>7.0f} {c['grads']:>7.0f} {c['optimizer']:>7.0f} "
            f"{x['model_state_mb']:>8.0f} {x['model_state_bytes_per_param']:>7.2f} {c['other']:>7.0f} "
            f"{x['saved_activations_mb']:>9.0f} | {x['baseline_mb']:>8.0f} {x['model_state_rss_mb']:>9.0f} "
            f"{x['activations_rss_mb']:>8.0f} {x['peak_mb']:>7.0f}  steps "
            + ", ".join(f"{t:.1f}" for t in x["step_s"])
            + " s"
        )
    return head + "\n" + "\n".join(rows)


def scaling(results: list[dict[str, Any]]) -> dict[str, float]:
    """Rank 0's model state (census and RSS) with the most ranks over that with the fewest."""
    first, last = results[0]["ranks"][0], results[-1]["ranks"][0]
    return {
        "ratio": last["model_state_mb"] / first["model_state_mb"],
        "ratio_rss": last["model_state_rss_mb"] / first["model_state_rss_mb"],
        "ranks": [results[0]["nproc"], results[-1]["nproc"]],
    }


def _launch(cfg: BenchMemoryConfig, nproc: int, out: Path) -> dict[str, Any]:
    code = relaunch("memory", nproc, **MALLOC_ENV, **{OUT_ENV: str(out)})
    if code:
        sys.exit(code)
    return json.loads(out.read_text())


def run(cfg: BenchMemoryConfig) -> dict[str, Any] | None:
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
        result = measure(cfg)
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            if os.environ.get(OUT_ENV):
                Path(os.environ[OUT_ENV]).write_text(json.dumps(result))
            else:
                print(json.dumps(result) if cfg.json else table(result), flush=True)
        sys.stdout.flush()
        os._exit(0)  # the figures are out; skip teardown (gloo threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = [_launch(cfg, n, Path(tmp) / f"{n}.json") for n in cfg.counts()]
    summary = {"runs": results, **(scaling(results) if len(results) > 1 else {})}
    if cfg.json:
        print(json.dumps(summary))
    else:
        print("\n\n".join(table(r) for r in results))
        if len(results) > 1:
            print(
                f"\nmodel state per rank, {summary['ranks'][1]} vs {summary['ranks'][0]} ranks: "
                f"{summary['ratio']:.3f} (tensors), {summary['ratio_rss']:.3f} (RSS)"
            )
    return summary
