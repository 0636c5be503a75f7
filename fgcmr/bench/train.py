"""``fgcmr bench train``: fgcmr's training step vs a bare forward+backward+step loop, side by side.

Both run the same model (same seed), the same loss and the same in-memory micro-batches on the same
number of processes, in alternating rounds so machine noise hits both alike. fgcmr's side is the
real ``Trainer`` (DeepSpeed engine, global-batch loss, monitoring with TensorBoard on rank 0, stop-
signal agreement); the bare side is ``torch.optim.AdamW`` on the model (DDP when > 1 process) with
the same clipping. The ratio fgcmr/bare is the framework's overhead; the goal is ≥ 0.95.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fgcmr.config import Validated
from fgcmr.bench.host import machine
from fgcmr.bench.ranks import relaunch
from fgcmr.distributed import all_gather_objects, barrier
from fgcmr.losses import LossConfig, RetrievalLoss
from fgcmr.model import ModelConfig
from fgcmr.train.config import load_model_config
from fgcmr.runtime.engine import build_engine, compute_dtype, deepspeed_config, param_groups
from fgcmr.train.loop import Trainer, build_model_for, init_distributed
from fgcmr.runtime.monitor import Monitor
from fgcmr.runtime.optim import OptimConfig
from fgcmr.train.signals import StopRequest


@dataclasses.dataclass
class BenchTrainConfig(Validated):
    model: str = "tiny"  # configs/models/<name>.yaml or a path to one
    deepspeed: str = "zero0_fp32"  # configs/deepspeed/<name>.json or a path to one
    loss: str = "pairwise"  # a loss name (as --loss.name of train)
    nproc: int = 2  # processes, started here unless already under a launcher
    micro_batch: int = 32  # samples per rank and step
    steps: int = 10  # measured steps per round and side
    warmup: int = 5  # unmeasured steps per side before the first round
    rounds: int = 7  # alternating fgcmr / bare rounds; the reported ratio is the median of the rounds' ratios
    batches: int = 8  # distinct in-memory micro-batches, cycled
    peer: str | None = None  # "open_clip": fgcmr train vs open_clip's trainer instead (fgcmr.bench.peer_open_clip)
    shards: str | None = None  # the peer comparison's dataset (default: synthetic shards)
    json: bool = False  # print one JSON object instead of the table

    def validate(self) -> None:
        if min(self.nproc, self.steps, self.rounds, self.batches) < 1:
            raise ValueError("nproc, steps, rounds and batches must be ≥ 1")


def synthetic_batches(cfg: ModelConfig, n: int, micro_batch: int, seed: int) -> list[dict]:
    """Random inputs of the model's shapes (images, token ids or features), categories 0–9."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if cfg.image.kind == "timm":
            size = cfg.image.image_size or 224
            image = torch.randn(micro_batch, 3, size, size, generator=g)
        else:
            image = torch.randn(micro_batch, cfg.image.feature_dim, generator=g)
        if cfg.text.kind == "transformers":
            ids = torch.randint(
                5,
                int(cfg.text.config["vocab_size"]),
                (micro_batch, cfg.text.max_length),
                generator=g,
            )
            text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            text = torch.randn(micro_batch, cfg.text.feature_dim, generator=g)
        out.append(
            {
                "image": image,
                "text": text,
                "category": torch.randint(0, 10, (micro_batch,), generator=g),
                "image_id": torch.randint(0, 1 << 62, (micro_batch,), generator=g),
            }
        )
    return out


def cycle(batches: list[dict]):
    while True:
        yield from batches


def _fresh_model(model_cfg: ModelConfig, loss: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model_for(model_cfg, LossConfig(name=loss))


def _bare_side(model_cfg: ModelConfig, optim: OptimConfig, loss_fn: RetrievalLoss, device: torch.device):
    model = _fresh_model(model_cfg, loss_fn.cfg.name).to(device)
    opt = torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    net = (
        torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        else model
    )

    def step(batch: dict) -> None:
        image_emb, text_emb, scale = net(batch["image"], batch["text"])
        loss = loss_fn(image_emb, text_emb, batch, scale).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()

    return step


def _timed(fn, n: int) -> float:
    barrier()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    barrier()
    return time.perf_counter() - t


def measure(cfg: BenchTrainConfig) -> dict:
    env = init_distributed()
    model_cfg = load_model_config(cfg.model)
    optim = OptimConfig(warmup_steps=1)
    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.micro_batch, optim)
    loss_fn = RetrievalLoss(LossConfig(name=cfg.loss))
    from fgcmr.train.step import to_device

    dtype = compute_dtype(ds_cfg)
    batches = [
        to_device(b, env.device, torch.float32)
        for b in synthetic_batches(model_cfg, cfg.batches, cfg.micro_batch, seed=env.rank)
    ]
    engine, _ = build_engine(_fresh_model(model_cfg, cfg.loss), ds_cfg, optim, total_steps=1 << 30)
    with tempfile.TemporaryDirectory() as tb:
        monitor = Monitor(
            Path(tb), env.is_main, 1 << 30, cfg.micro_batch * env.world_size, log_every=10, hist_every=100
        )
        trainer = Trainer(engine, loss_fn, monitor, dtype, grad_accum=1)
        stop = StopRequest(engine.device)
        fg_iter, state = cycle(batches), {"step": 0}

        def fgcmr_step() -> None:
            state["step"] = trainer.step(fg_iter, state["step"])
            stop.agreed()

        bare_iter, bare = cycle(batches), _bare_side(model_cfg, optim, loss_fn, env.device)
        _timed(fgcmr_step, cfg.warmup)
        _timed(lambda: bare(next(bare_iter)), cfg.warmup)
        fg_times, bare_times = [], []
        for _ in range(cfg.rounds):
            fg_times.append(_timed(fgcmr_step, cfg.steps))
            bare_times.append(_timed(lambda: bare(next(bare_iter)), cfg.steps))
        stop.restore()
        monitor.close()
    samples = cfg.rounds * cfg.steps * cfg.micro_batch * env.world_size
    round_ratios = sorted(b / f for b, f in zip(bare_times, fg_times))
    result = {
        "fgcmr_samples_per_s": samples / sum(fg_times),
        "bare_samples_per_s": samples / sum(bare_times),
        "ratio": round_ratios[
            len(round_ratios) // 2
        ],  # median over rounds: robust to bursts of load from other processes
        "ratio_overall": sum(bare_times) / sum(fg_times),
        "round_ratios": round_ratios,
        "model": cfg.model,
        "deepspeed": cfg.deepspeed,
        "loss": cfg.loss,
        "processes": env.world_size,
        "micro_batch": cfg.micro_batch,
        "steps": cfg.rounds * cfg.steps,
        "machine": machine(),
    }
    all_gather_objects(None)
    return result


def run(cfg: BenchTrainConfig) -> dict | None:
    if cfg.peer is not None:
        from fgcmr.bench.peer_open_clip import BenchPeerConfig
        from fgcmr.bench.peer_open_clip import run as run_peer

        peer = BenchPeerConfig(
            peer=cfg.peer,
            model=cfg.model,
            shards=cfg.shards,
            nproc=cfg.nproc,
            micro_batch=cfg.micro_batch,
            json=cfg.json,
        )
        return run_peer(peer)
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ and cfg.nproc > 1:
        code = relaunch("train", cfg.nproc, FGCMR_BENCH_RANK="1")
        if code:
            sys.exit(code)
        return None
    result = measure(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        if cfg.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"machine: {result['machine']}\n"
                f"model {cfg.model}, {cfg.deepspeed}, loss {cfg.loss}, {result['processes']} processes × "
                f"micro-batch {cfg.micro_batch}, {result['steps']} steps per side\n"
                f"fgcmr train : {result['fgcmr_samples_per_s']:8.1f} samples/s\n"
                f"bare loop   : {result['bare_samples_per_s']:8.1f} samples/s\n"
                f"ratio       : {result['ratio']:.3f} (median of {cfg.rounds} alternating rounds; "
                f"overall {result['ratio_overall']:.3f}; goal ≥ 0.95)",
                flush=True,
            )
    if os.environ.get("FGCMR_BENCH_RANK"):
        # A rank we launched ourselves: the figures are out, so skip interpreter teardown, where
        # DDP's and gloo's threads now and then abort the process after a successful run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return result
