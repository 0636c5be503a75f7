"""``fgcmr bench gpu``: absolute training throughput of one process, with model FLOPs utilisation (MFU).

One rank, fgcmr's own DeepSpeed engine and micro-step (``fgcmr.runtime.engine`` / ``fgcmr.train.step``),
measured twice: on synthetic in-memory batches (the compute ceiling) and on WebDataset shards through
the training input pipeline (``fgcmr.train.data``), so the gap between the two is the data pipeline's.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
backward of the model (and its similarity matrix) on two samples of each mode's first batch, before
the engine exists, divided by two. It counts matrix multiplies, convolutions and attention, not
elementwise ops, and no recomputation (so it is MFU, not hardware FLOPs utilisation, even with
gradient checkpointing on). MFU = counted FLOPs/s ÷ the device's dense peak for the compute dtype
(``PEAK_TFLOPS``), or ``peak_tflops`` when given; on CPU there is no table entry and MFU is not reported.

Peak memory: ``torch.cuda.max_memory_allocated`` over the measured steps on GPU; on CPU the process's
peak RSS (``ru_maxrss``, including the ~1.2 GB of imports).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fgcmr.bench.host import sync
from fgcmr.config import Validated, dump_yaml, to_dict
from fgcmr.io import atomic_write_json, atomic_write_text
from fgcmr.losses import LossConfig, RetrievalLoss
from fgcmr.model import Inputs, ModelConfig, build_model

log = logging.getLogger("fgcmr.bench")

# Dense (non-sparse) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, for bf16/fp16 and tf32;
# the datasheets quote sparse figures, these are half of those. Most specific name first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "fp32": 417.5}),  # H200 NVL datasheet: 1,671 bf16 / 835 tf32 with sparsity
    ("H200", {"bf16": 989.4, "fp32": 494.7}),  # H200 SXM datasheet: 1,979 bf16 / 989 tf32 with sparsity
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),  # H100 PCIe datasheet: 1,513 / 756 with sparsity
    ("H100", {"bf16": 989.4, "fp32": 494.7}),  # H100 SXM datasheet: 1,979 / 989 with sparsity
    ("A100", {"bf16": 312.0, "fp32": 156.0}),  # A100 datasheet: 312 bf16 / 156 tf32 dense
    ("L40S", {"bf16": 362.1, "fp32": 183.0}),  # L40S datasheet: 733 / 366 with sparsity
    ("L4", {"bf16": 121.0, "fp32": 60.0}),  # L4 datasheet: 242 / 120 with sparsity
]


@dataclasses.dataclass
class BenchGpuConfig(Validated):
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the model measured
    deepspeed: str = "zero2_bf16"  # configs/deepspeed/<name>.json; a *_fp32 config on CPU
    loss: str = "pairwise"  # a loss name (as --loss.name of train)
    micro_batch: int = 128  # samples per step
    steps: int = 30  # measured steps per mode
    warmup: int = 5  # unmeasured steps before each mode
    # synthetic: in-memory batches; shards: the real input pipeline
    modes: list[str] = dataclasses.field(default_factory=lambda: ["synthetic", "shards"])
    shards: str | None = None  # dataset dir for the shards mode; default: synthetic shards made here
    shard_items: int = 4000  # size of those synthetic shards
    workers: int = 8  # data-loader workers (shards mode)
    peak_tflops: float | None = None  # overrides the table (e.g. for a GPU it does not know)
    out: str | None = None  # writes bench_gpu.json + config.yaml there
    json: bool = False  # print one JSON object instead of the table
    # Further cases measured after this one, each {name, and fields of this config to change}; a case's
    # ``model`` may name a configs/models/<name>.yaml (e.g. the large model under ZeRO-3 + bf16).
    cases: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        for case in self.cases:
            if "name" not in case:
                raise ValueError(f"every bench case needs a name; got {case}")
            case_config(self, case)  # validates itself
        if set(self.modes) - {"synthetic", "shards"} or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of synthetic, shards; got {self.modes}")
        if min(self.micro_batch, self.steps) < 1 or self.warmup < 0:
            raise ValueError("micro_batch and steps must be ≥ 1, warmup ≥ 0")
        if self.model.image.kind != "timm" or self.model.text.kind != "transformers":
            raise ValueError("the GPU benchmark needs a timm image tower and a transformers text tower")


def case_config(cfg: BenchGpuConfig, case: dict[str, Any]) -> BenchGpuConfig:
    """``cfg`` with a case's fields changed (its ``model`` a config name or a mapping)."""
    from fgcmr.config import build
    from fgcmr.train.config import load_model_config

    fields = {k: v for k, v in case.items() if k != "name"}
    if isinstance(fields.get("model"), str):
        fields["model"] = load_model_config(fields["model"])
    elif "model" in fields:
        fields["model"] = build(ModelConfig, fields["model"], "model")
    return dataclasses.replace(cfg, cases=[], **fields)


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "fp32" if dtype == torch.float32 else "bf16"
    return next((peaks[key] for part, peaks in PEAK_TFLOPS if part in name), None)


def count_flops(
    model: torch.nn.Module,
    batch: dict,
    device: torch.device,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    samples: int = 2,
) -> float:
    """Model FLOPs of one forward + backward per sample, counted on ``samples`` samples of ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    from fgcmr.train.step import to_device

    part = to_device(
        {"image": batch["image"][:samples], "text": _slice_text(batch["text"], samples)},
        device,
        torch.float32,
        normalize,
    )
    with FlopCounterMode(display=False) as counter:
        image_emb, text_emb, scale = model(part["image"], part["text"])
        (scale * image_emb @ text_emb.T).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / samples


def _slice_text(text, n: int):
    return {k: v[:n] for k, v in text.items()} if isinstance(text, dict) else text[:n]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_steps(step: Callable[[], float], n: int, device: torch.device) -> tuple[float, float]:
    """Run ``n`` steps; (wall seconds, seconds spent waiting for data as reported by ``step``)."""
    sync(device)
    t = time.perf_counter()
    waited = sum(step() for _ in range(n))
    sync(device)
    return time.perf_counter() - t, waited


def shard_batches(
    cfg: BenchGpuConfig, model_cfg: ModelConfig, work: Path, batches: int
) -> tuple[Inputs, Iterator[dict]]:
    """The training input pipeline over ``cfg.shards`` (or synthetic shards at the model's image size),
    with a WordPiece tokenizer trained on the shards' texts; the model keeps its configured vocabulary."""
    from fgcmr.bench.peer_open_clip import synthetic_shards, train_tokenizer
    from fgcmr.dataset import open_dataset
    from fgcmr.model import build_inputs
    from fgcmr.train.config import DataConfig
    from fgcmr.train.data import build_loader

    root = (
        Path(cfg.shards)
        if cfg.shards
        else synthetic_shards(work / "shards", cfg.shard_items, model_cfg.image.image_size or 224)
    )
    dataset = open_dataset(str(root))
    text = dataclasses.replace(
        model_cfg.text, tokenizer_dir=str(train_tokenizer(dataset, model_cfg, work / "tokenizer"))
    )
    model_cfg = dataclasses.replace(model_cfg, text=text)
    inputs = build_inputs(model_cfg, train=False)
    data = DataConfig(micro_batch=cfg.micro_batch, workers=cfg.workers, shuffle_buffer=min(1000, 4 * cfg.micro_batch))
    loader = build_loader(dataset, inputs, data, world_size=1, batches_per_rank=batches, seed=0)
    return inputs, iter(loader)


def measure(cfg: BenchGpuConfig, work: Path) -> dict[str, Any]:
    from fgcmr.bench.host import machine
    from fgcmr.bench.train import synthetic_batches
    from fgcmr.runtime.optim import OptimConfig
    from fgcmr.runtime.engine import build_engine, compute_dtype, deepspeed_config
    from fgcmr.train.loop import init_distributed
    from fgcmr.train.step import micro_step, to_device

    env = init_distributed()
    if env.world_size != 1:
        raise RuntimeError("fgcmr bench gpu measures one process; run it without a launcher")
    device = env.device
    optim = OptimConfig(warmup_steps=1)
    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.micro_batch, optim)
    dtype = compute_dtype(ds_cfg)
    model_cfg = cfg.model
    sources: dict[str, Iterator[dict]] = {}
    first: dict[str, dict] = {}
    normalize = {}  # mode → uint8 pixels to the image tower's input
    if "shards" in cfg.modes:  # first: its loader workers fork before CUDA is initialised
        inputs, it = shard_batches(cfg, model_cfg, work, cfg.warmup + cfg.steps + 1)
        first["shards"], normalize["shards"] = next(it), inputs.normalize
        sources["shards"] = itertools.chain([first["shards"]], it)
        log.info("shards: text tokenised with %s (model vocabulary unchanged)", inputs.cfg.text.tokenizer_dir)
    if "synthetic" in cfg.modes:
        mem = [to_device(b, device, dtype) for b in synthetic_batches(model_cfg, 4, cfg.micro_batch, seed=0)]
        sources["synthetic"], first["synthetic"] = itertools.cycle(mem), mem[0]

    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    flops = {mode: count_flops(model, b, device, normalize.get(mode)) for mode, b in first.items()}
    engine, _ = build_engine(model, ds_cfg, optim, total_steps=1 << 30)
    loss_fn = RetrievalLoss(LossConfig(name=cfg.loss))
    peak = cfg.peak_tflops or peak_tflops(device, dtype)

    results = {}
    for mode in cfg.modes:
        source = sources[mode]

        def step(source=source, mode=mode) -> float:
            t = time.perf_counter()
            batch = to_device(next(source), device, dtype, normalize.get(mode))
            waited = time.perf_counter() - t
            micro_step(engine, loss_fn, batch)
            return waited

        timed_steps(step, cfg.warmup, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, waited = timed_steps(step, cfg.steps, device)
        samples_per_s = cfg.steps * cfg.micro_batch / seconds
        achieved = flops[mode] * samples_per_s / 1e12
        results[mode] = {
            "samples_per_s": samples_per_s,
            "step_time_s": seconds / cfg.steps,
            "data_wait_frac": waited / seconds,
            "peak_memory_mb": _peak_memory_mb(device),
            "gflops_per_sample": flops[mode] / 1e9,
            "tflops": achieved,
            "mfu": achieved / peak if peak else None,
        }
    return {
        "modes": results,
        "device": str(device),
        "machine": machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "deepspeed": cfg.deepspeed,
        "micro_batch": cfg.micro_batch,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "parameters": params,
        "peak_tflops": peak,
        "image_tower": model_cfg.image.name,
        "text_tower": {
            k: v for k, v in model_cfg.text.config.items() if k in ("model_type", "hidden_size", "num_hidden_layers")
        },
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "flops_method": "FlopCounterMode, forward+backward, per sample",
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        f"{'mode':<10} {'samples/s':>10} {'step s':>8} {'data wait':>9} {'peak MB':>9} "
        f"{'GFLOP/smp':>10} {'TFLOP/s':>8} {'MFU':>6}"
    ]
    for mode, r in result["modes"].items():
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        rows.append(
            f"{mode:<10} {r['samples_per_s']:>10.1f} {r['step_time_s']:>8.3f} {100 * r['data_wait_frac']:>8.1f}% "
            f"{r['peak_memory_mb']:>9.0f} {r['gflops_per_sample']:>10.2f} {r['tflops']:>8.3g} {mfu:>6}"
        )
    peak = f"{result['peak_tflops']} TFLOP/s" if result["peak_tflops"] else "unknown (MFU n/a)"
    head = (
        f"machine: {result['machine']}\n"
        f"{result['image_tower']} + {result['text_tower']}, {result['parameters'] / 1e6:.1f} M parameters, "
        f"{result['deepspeed']} ({result['dtype']}), micro-batch {result['micro_batch']}, "
        f"{result['steps']} steps per mode on {result['device']}; "
        f"peak {peak}; memory: {result['peak_memory_kind']}"
    )
    return head + "\n" + "\n".join(rows)


def run(cfg: BenchGpuConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fgcmr-bench-gpu-") as tmp:
        result = measure(cfg, Path(tmp))
        cases = {}
        for case in cfg.cases:  # the shards made for the first case serve the others (same image size)
            made = Path(tmp) / "shards"
            case = {"shards": str(made), **case} if made.is_dir() and not cfg.shards else case
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cases[case["name"]] = measure(case_config(cfg, case), Path(tmp) / case["name"])
    if cases:
        result["cases"] = cases
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "bench_gpu.json", result)
        atomic_write_text(out / "config.yaml", dump_yaml(to_dict(cfg)))
    tables = [table(result)] + [f"case {name}:\n{table(r)}" for name, r in cases.items()]
    print(json.dumps(result) if cfg.json else "\n\n".join(tables), flush=True)
    return result
