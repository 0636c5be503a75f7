"""``fgcmr train``: DeepSpeed training of the two-tower model on sharded data, resumable and signal-safe.

Run directory: ``config.yaml`` (the resolved train, model and DeepSpeed configs), ``tokenizer/``
(when trained on the data), ``checkpoints/`` (see ``checkpoint``), ``tensorboard/`` and
``train_metrics.json`` (the last logged figures), ``fgcmr-stage.json`` (its fingerprint, ``train.state``).
Exit code ``EXIT_REQUEUE`` (75) after a SIGTERM/SIGUSR1/SIGINT-triggered checkpoint; rerun with ``--resume=auto``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from fgcmr import startup
from fgcmr.config import dump_yaml, to_dict
from fgcmr.dataset import DatasetInfo, iter_samples, open_dataset
from fgcmr.distributed import DistEnv, barrier
from fgcmr.io import atomic_write_json, atomic_write_text, clean_leftovers
from fgcmr.labels import read_head
from fgcmr.losses import LossConfig, RetrievalLoss
from fgcmr.model import ModelConfig, TwoTower, bind_tokenizer, build_inputs, build_model, fit_tokenizer
from fgcmr.model.export import WEIGHTS
from fgcmr.model.tokenizer import tokenizer_file
from fgcmr.model.partitioned import load_into, open_weights, partitioned_construction
from fgcmr.run import record_requeue
from fgcmr.train import checkpoint, state
from fgcmr.train.config import DataConfig, TrainConfig, load_model_config
from fgcmr.train.data import build_loader
from fgcmr.runtime.engine import build_engine, compute_dtype, deepspeed_config, init_distributed
from fgcmr.runtime.monitor import Monitor
from fgcmr.train.signals import EXIT_REQUEUE, StopRequest
from fgcmr.train.step import micro_step, to_device
from fgcmr.train.validate import Validator, validation_split

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = ["TrainConfig", "run"]
log = logging.getLogger("fgcmr.train")


@dataclasses.dataclass(frozen=True)
class Schedule:
    world_size: int
    micro_batch: int
    grad_accum: int
    samples_per_epoch: int
    epochs: int
    max_steps: int | None

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.samples_per_epoch // self.samples_per_step)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch


def with_tokenizer(
    model_cfg: ModelConfig, dataset: DatasetInfo, run_dir: Path, env: DistEnv, data: DataConfig
) -> ModelConfig:
    """A transformers tower built from a config is bound (``bind_tokenizer``) to its given tokenizer, or to a
    WordPiece tokenizer fitted on the split's texts (once, by rank 0, kept in the run dir for resumes and export);
    a tfidf tower likewise to its TF-IDF vectoriser."""
    text = model_cfg.text
    if text.kind == "feature" or (text.kind == "transformers" and text.pretrained_dir):
        return model_cfg
    if text.tokenizer_dir:
        return dataclasses.replace(model_cfg, text=bind_tokenizer(text, text.tokenizer_dir))
    tok_dir = run_dir / "tokenizer"
    if env.is_main and not (tok_dir / tokenizer_file(text)).is_file():
        samples = (t for shard in dataset.shards(data.split) for s in iter_samples(shard) for t in s.texts)
        fit_tokenizer(text, itertools.islice(samples, data.tokenizer_samples), tok_dir)
        log.info("fitted the %s text tower's tokenizer on %s texts → %s", text.kind, data.split, tok_dir)
    barrier()
    return dataclasses.replace(model_cfg, text=bind_tokenizer(text, tok_dir))


def forever(loader) -> Iterator[dict]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # would spin forever without a step or a message
            raise RuntimeError(
                "the training loader yielded no batch in a whole pass; check the split's shards and micro_batch"
            )


def build_model_for(
    model_cfg: ModelConfig, loss: LossConfig, ds_cfg: dict[str, Any] | None = None, init_from: str | None = None
) -> TwoTower:
    """The model with the temperature frozen unless the loss uses it (an unused trainable parameter
    gets no gradient, which DDP-style reducers reject). Under ZeRO-3 (``ds_cfg``) it is built
    partitioned (``partitioned_construction``); ``init_from`` (an fgcmr export) loads its weights."""
    with partitioned_construction(ds_cfg):
        model = build_model(model_cfg)
    if init_from:
        path = Path(init_from) / WEIGHTS
        log.info("initialising from %s (%d tensors)", path, load_into(model, open_weights(path), path))
    model.logit_scale.requires_grad_(loss.name == "clip")
    return model


def log_first_step(data_time: float) -> None:
    """One line saying how long the job took to its first step, and where the time went."""
    startup.mark("first step")
    log.info(
        "first step after %.1f s (%s; of the first step, %.1f s waiting for the first batch)",
        startup.total(),
        startup.summary(),
        data_time,
    )


class Trainer:
    """One optimizer step (``grad_accum`` micro-steps) with its timing and monitoring: the unit the
    training loop repeats and ``fgcmr bench train`` measures."""

    def __init__(
        self,
        engine: DeepSpeedEngine,
        loss_fn: RetrievalLoss,
        monitor: Monitor,
        dtype: torch.dtype,
        grad_accum: int,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.engine, self.loss_fn, self.monitor, self.dtype, self.grad_accum = (
            engine,
            loss_fn,
            monitor,
            dtype,
            grad_accum,
        )
        self.normalize = normalize  # uint8 pixels → the image tower's input (``Inputs.normalize``)
        self.data_time = 0.0  # of the last step: waiting for its batches

    def step(self, batches: Iterator[dict], step: int) -> int:
        t0 = time.perf_counter()
        data_time = 0.0
        measure = self.monitor.logs_at(step + 1)
        lr = self.engine.get_lr()[0]  # the rate this step uses (the head group's; towers' is × tower_lr_mult)
        for _ in range(self.grad_accum):
            t = time.perf_counter()
            batch = to_device(next(batches), self.engine.device, self.dtype, self.normalize)
            data_time += time.perf_counter() - t
            out, grad_norm = micro_step(self.engine, self.loss_fn, batch, measure_grad_norm=measure)
        step += 1
        self.data_time = data_time
        self.monitor.update(step, out, time.perf_counter() - t0, data_time, lr, grad_norm)
        return step


def client_state(step: int, samples_seen: int, sched: Schedule, world_size: int) -> dict[str, Any]:
    """Where training stands, saved with each checkpoint (what ``--resume`` continues from)."""
    return {
        "step": step,
        "samples_seen": samples_seen,
        "epoch": samples_seen / sched.samples_per_epoch,
        "world_size": world_size,
    }


def run(cfg: TrainConfig) -> dict[str, Any]:
    fp = state.train_fingerprint(cfg, strict=True)  # cheap input checks, before any heavy start-up
    state.guard(cfg, fp)
    startup.mark("python + imports")
    env = init_distributed()
    startup.mark("process group")
    run_dir, dataset = Path(cfg.out), open_dataset(cfg.shards)
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        clean_leftovers(run_dir, ckpt_dir, *checkpoint.step_tags(ckpt_dir))
    model_cfg = with_tokenizer(load_model_config(cfg.model, cfg.model_overrides), dataset, run_dir, env, cfg.data)
    startup.mark("tokenizer")
    sched = Schedule(
        env.world_size,
        cfg.data.micro_batch,
        cfg.optim.grad_accum,
        cfg.data.samples_per_epoch or dataset.items(cfg.data.split),
        cfg.epochs,
        cfg.max_steps,
    )

    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
    random.seed(cfg.seed + env.rank)  # timm's augmentation draws from Python's RNG (in the rank when workers=0)
    np.random.seed(cfg.seed + env.rank)
    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.data.micro_batch, cfg.optim)
    engine, _ = build_engine(
        build_model_for(model_cfg, cfg.loss, ds_cfg, cfg.init_from), ds_cfg, cfg.optim, sched.total_steps
    )
    head = None
    if cfg.loss.needs_labels:
        w, c = read_head(dataset.root, cfg.labels)
        head = (torch.from_numpy(w).to(engine.device), c)
    loss_fn = RetrievalLoss(cfg.loss, head)
    startup.mark("model + DeepSpeed")

    client = checkpoint.resume(engine, ckpt_dir, cfg.resume) if cfg.resume else None
    step, samples_seen = (client["step"], client["samples_seen"]) if client else (0, 0)
    resolved = {
        "train": to_dict(cfg),
        "model": to_dict(model_cfg),
        "deepspeed": ds_cfg,
        "schedule": {**dataclasses.asdict(sched), "total_steps": sched.total_steps},
    }
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(resolved))
        state.record(cfg, fp, step, sched.total_steps, complete=False)

    inputs = build_inputs(model_cfg, train=cfg.data.augment)
    # Resampled shards are endless, so one pass of the loader covers the rest of the run: a pass per epoch
    # restarted every worker's pipeline (empty prefetch queue, shuffle buffer refilled) and stalled the step.
    steps_per_pass = sched.total_steps - step if cfg.data.resampled else sched.steps_per_epoch
    loader = build_loader(
        dataset,
        inputs,
        cfg.data,
        env.world_size,
        batches_per_rank=max(1, steps_per_pass) * sched.grad_accum,
        seed=cfg.seed + 1_000_003 * step,
        labeler=cfg.labels if cfg.loss.needs_labels else None,
    )
    monitor = Monitor(run_dir, env.is_main, sched.total_steps, sched.samples_per_step, cfg.log_every, cfg.hist_every)
    monitor.text("config", dump_yaml(resolved))
    trainer = Trainer(engine, loss_fn, monitor, compute_dtype(ds_cfg), sched.grad_accum, inputs.normalize)
    stop = StopRequest(engine.device)
    checkpointer = checkpoint.Checkpointer(
        engine, ckpt_dir, cfg.checkpoint_every, cfg.keep_last, step if client else None
    )
    validator = (
        Validator(
            dataset,
            validation_split(dataset, cfg.eval_split),
            cfg.eval_max_images,
            build_inputs(model_cfg, train=False),
            cfg.eval_every,
        )
        if cfg.eval_every
        else None
    )

    log.info(
        "training %d steps of %d samples (%d ranks × %d × accum %d) from step %d; validation: %s",
        sched.total_steps,
        sched.samples_per_step,
        env.world_size,
        cfg.data.micro_batch,
        cfg.optim.grad_accum,
        step,
        f"every {cfg.eval_every} steps on split {validator.split!r}" if validator else "off (--eval_every=N)",
    )
    batches = forever(loader)
    startup.mark("loader + resume")
    first = step
    try:
        while step < sched.total_steps:
            step = trainer.step(batches, step)
            if step == first + 1:
                log_first_step(trainer.data_time)
            samples_seen += sched.samples_per_step
            progress = client_state(step, samples_seen, sched, env.world_size)
            if checkpointer.due(step):
                checkpointer.save(step, progress)
            if validator is not None:
                validator.maybe(step, sched.total_steps, engine.module, engine.device, trainer.dtype, monitor)
            if stop.agreed():
                log.warning(
                    "stop signal received: checkpointing at step %d, exiting %d for requeue", step, EXIT_REQUEUE
                )
                checkpointer.save(step, progress)
                record_requeue(step)
                if env.is_main:
                    log.warning(
                        "stopped at step %d of %d; continue with the same command and --resume=auto",
                        step,
                        sched.total_steps,
                    )
                sys.exit(EXIT_REQUEUE)
        checkpointer.save(step, client_state(step, samples_seen, sched, env.world_size))
    finally:  # the loader's workers ignore SIGTERM: build_loader's exit hook kills them (kill_workers_at_exit)
        stop.restore()
        monitor.close()
    summary = {"step": step, "samples_seen": samples_seen, "world_size": env.world_size, **monitor.last_values}
    if env.is_main:
        atomic_write_json(run_dir / "train_metrics.json", summary)
        state.record(cfg, fp, step, sched.total_steps, complete=True)
    barrier()
    return summary
