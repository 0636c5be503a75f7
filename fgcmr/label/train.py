"""``fgcmr label train``: fit the siamese labeler on text pairs of the train split.

Each rank draws a batch of anchor texts plus, for every anchor, one partner text of the same group
(category, or image without categories), so every batch holds positives. Scores of every in-batch
pair across all ranks form the logits; the loss is binary cross-entropy with positives and negatives
weighted equally. A validation part carved from the train split (whole images) drives early stopping
(an evaluation counts as better only by ``min_delta``), so the labeler does not memorise the pairs whose
hardness it will later report; then the head's scale and offset are calibrated on that held-out part
(Platt scaling), since the training pairs' scores are overconfident. ROC-AUC on train, validation and
test goes to ``metrics.json`` and TensorBoard, the final ones at the last step trained.

It trains through fgcmr's one training stack, as the two-tower model does (the labeler is just another
model and loss): ``fgcmr.runtime.engine`` (the DeepSpeed engine, which averages gradients across ranks,
and the warm-up/cosine schedule) and ``fgcmr.runtime.monitor`` (TensorBoard).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fgcmr.config import ConfigError, dump_yaml
from fgcmr.dataset import open_dataset
from fgcmr.distributed import DistEnv, all_gather_with_grad, barrier
from fgcmr.io import atomic_write_json, atomic_write_text
from fgcmr.label.config import LabelTrainConfig, labeler_fingerprint
from fgcmr.label.encode import embed_texts
from fgcmr.label.metrics import PairStats, fit_platt, pair_stats, subsample
from fgcmr.label.model import SiameseLabeler, build_encoder, precision, save_labeler, tokenize
from fgcmr.label.texts import TextSet, read_texts
from fgcmr.labels import relevance
from fgcmr.progress import Progress, figure
from fgcmr.run import clear_stamp, write_stamp
from fgcmr.text import ensure_tokenizer, load_tokenizer
from fgcmr.runtime.engine import build_engine, deepspeed_config, init_distributed
from fgcmr.runtime.monitor import Monitor
from fgcmr.runtime.optim import OptimConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger("fgcmr.label")


class PairSampler:
    """Anchors uniformly over texts, each with a random partner from its own group (another text if any)."""

    def __init__(self, texts: TextSet, seed: int):
        group = np.where(texts.category >= 0, texts.category, -1 - texts.image)
        _, inverse = np.unique(group, return_inverse=True)
        self.members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        self.group = inverse
        self.rng = np.random.default_rng(seed)
        self.n = len(texts)

    def __call__(self, anchors: int) -> np.ndarray:
        a = self.rng.integers(0, self.n, anchors)
        partners = []
        for i in a:
            pool = self.members[self.group[i]]
            j = i
            while len(pool) > 1 and j == i:
                j = pool[self.rng.integers(0, len(pool))]
            partners.append(j)
        return np.concatenate([a, np.asarray(partners, dtype=a.dtype)])


def check_positive_pairs(texts: TextSet, where: str) -> None:
    """The labeler learns from pairs of distinct relevant texts: two captions of one image, or one category.

    A corpus with one caption per image and no categories has none (every positive would be a text with
    itself); the fine-grained weights then cannot be learned, so say what to do instead of training on
    negatives only."""
    group = np.where(texts.category >= 0, texts.category, -1 - texts.image)
    if len(group) and np.unique(group).size == len(group):
        raise ConfigError(
            f"{where}: every image has one text and there are no categories, so the labeler has no "
            "positive pairs to learn from; train with --loss.name=pairwise (or clip), or shard a "
            "corpus with several captions per image or a --category_col"
        )


def balanced_bce(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE over valid positives and over valid negatives, averaged with equal weight."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
    pos, neg = valid & (y > 0), valid & (y == 0)
    parts = [bce[m].mean() for m in (pos, neg) if m.any()]
    return sum(parts) / len(parts)


def freeze(model: SiameseLabeler, layers: int) -> None:
    """Stop gradients below layer ``layers`` (BERT-family names: ``embeddings.*``, ``encoder.layer.<i>.*``),
    and to an unused pooler (a trainable parameter without a gradient would still be reduced and decayed).

    Fine-tuning only the top of a pretrained encoder keeps most of what it knows and makes a step
    several times cheaper, since backward stops at the first trainable layer.
    """
    pooler = getattr(model.encoder, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    if layers == 0:
        return
    for name, p in model.encoder.named_parameters():
        parts = name.split(".")
        low = parts[0] == "embeddings" or (parts[:2] == ["encoder", "layer"] and int(parts[2]) < layers)
        if layers < 0 or low:
            p.requires_grad_(False)


def optim_config(cfg: LabelTrainConfig) -> OptimConfig:
    """The engine's optimizer and schedule: torch's AdamW defaults, no clipping, cosine decay to 0."""
    return OptimConfig(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=[0.9, 0.999],
        eps=1e-8,
        warmup_steps=cfg.warmup_steps,
        min_lr_ratio=0.0,
        grad_clip=0.0,
    )


def deepspeed_settings(cfg: LabelTrainConfig, device: torch.device) -> dict[str, Any]:
    """ZeRO-0 with fp32 weights (so the saved encoder and head are fp32); bf16/fp16 run the forward under
    DeepSpeed's torch autocast, with gradients reduced in fp32."""
    ds_cfg = deepspeed_config("zero0_fp32", cfg.batch_size, optim_config(cfg))
    dtype = precision(cfg.dtype, device)
    if dtype != "fp32":
        ds_cfg["torch_autocast"] = {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
    return ds_cfg


def param_groups(model: SiameseLabeler, cfg: LabelTrainConfig) -> list[dict[str, Any]]:
    """The trainable encoder at ``encoder_lr``, the projection and head at ``lr`` (empty groups left out)."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups = [{"params": encoder, "lr": cfg.encoder_lr or cfg.lr}, {"params": head, "lr": cfg.lr}]
    return [g for g in groups if g["params"]]


class Labeling:
    """One labeler run's model, tokenizer and settings: what its training steps and evaluations share."""

    def __init__(
        self, cfg: LabelTrainConfig, model: SiameseLabeler, tokenizer: PreTrainedTokenizerBase, device: torch.device
    ):
        self.cfg, self.model, self.tokenizer, self.device = cfg, model, tokenizer, device

    def loss(self, engine: DeepSpeedEngine, texts: TextSet, idx: np.ndarray) -> torch.Tensor:
        """Loss of one batch: local rows against the texts of every rank (``engine`` wraps ``self.model``)."""
        batch = tokenize(self.tokenizer, [texts.texts[i] for i in idx], self.cfg.model.max_length)
        emb = engine(**{k: v.to(self.device) for k, v in batch.items()})
        all_emb = all_gather_with_grad(emb)
        meta = torch.from_numpy(np.stack([texts.category[idx], texts.image[idx], idx])).to(self.device)
        all_meta = all_gather_with_grad(meta.T.contiguous()).T
        y = relevance(meta[0], all_meta[0], meta[1], all_meta[1])
        valid = meta[2, :, None] != all_meta[2]  # a text paired with itself says nothing
        return balanced_bce(self.model.logits(emb, all_emb), y, valid)

    def embed(self, texts: TextSet) -> tuple[TextSet, torch.Tensor]:
        """(the at most ``max_eval_texts`` texts evaluated, their fp32 embeddings on the CPU), in eval mode."""
        cfg = self.cfg
        sub = subsample(texts, cfg.max_eval_texts, cfg.seed)
        self.model.eval()
        emb = embed_texts(
            self.model, self.tokenizer, sub.texts, cfg.model.max_length, cfg.eval_batch_size, self.device, cfg.dtype
        )
        self.model.train()
        return sub, emb

    def evaluate(self, texts: TextSet) -> PairStats:
        sub, emb = self.embed(texts)
        return pair_stats(emb, sub, self.model.w, self.model.c)

    def calibrate(self, val: TextSet) -> dict[str, float]:
        """Platt-scale the head on the held-out part: ``w ← a·w``, ``c ← a·c + b`` (every rank computes the same)."""
        sub, emb = self.embed(val)
        model = self.model
        with torch.no_grad():
            z = model.logits(emb.to(self.device), emb.to(self.device)).float().cpu()
        iu = torch.triu_indices(len(sub), len(sub), offset=1)
        y = sub.targets()[iu[0], iu[1]]
        if not 0 < int((y > 0).sum()) < len(y):
            log.warning("label train: no calibration (held-out part has only one kind of pair)")
            return {"scale": 1.0, "shift": 0.0}
        a, b = fit_platt(z[iu[0], iu[1]], y)
        if not a > 0:
            log.warning("label train: calibration gave a non-positive scale %.3g; head left as trained", a)
            return {"scale": 1.0, "shift": 0.0}
        with torch.no_grad():
            model.w.mul_(a)
            model.c.mul_(a).add_(b)
        log.info("label train: head calibrated on %d held-out texts (scale %.3f, shift %+.3f)", len(sub), a, b)
        return {"scale": a, "shift": b}


def make_tokenizer(cfg: LabelTrainConfig, train: TextSet, d: DistEnv) -> PreTrainedTokenizerBase:
    """A given tokenizer, the pretrained encoder's, or one trained on the train texts (rank 0 trains, all load)."""
    source = cfg.tokenizer or cfg.init
    if source:
        return load_tokenizer(source)
    path = Path(cfg.out) / "tokenizer"
    if d.is_main:
        ensure_tokenizer(train.texts, path, cfg.vocab_size, refit=True)  # a rerun's split or settings differ
    barrier()
    return load_tokenizer(path)


def run(cfg: LabelTrainConfig) -> dict:
    d = init_distributed(cfg.threads)
    torch.manual_seed(cfg.seed)
    if d.is_main:
        clear_stamp(Path(cfg.out))
    ds = open_dataset(cfg.shards)
    train = read_texts(cfg.shards, [cfg.train_split])
    check_positive_pairs(train, cfg.shards)
    if cfg.test_fraction > 0:
        train, test = train.split_by_image(cfg.test_fraction, cfg.seed + 1)
    else:
        test = read_texts(cfg.shards, [cfg.test_split]) if cfg.test_split in ds.split_names else None
    train, val = train.split_by_image(cfg.val_fraction, cfg.seed)
    log.info("label train: %d train / %d val / %s test texts", len(train), len(val), len(test) if test else "no")
    tokenizer = make_tokenizer(cfg, train, d)
    encoder = build_encoder(cfg.model, len(tokenizer), tokenizer.pad_token_id, cfg.init)
    model = SiameseLabeler(encoder, cfg.model.dim, cfg.model.pooling).to(d.device).train()
    freeze(model, cfg.freeze_layers)
    engine, _ = build_engine(
        model, deepspeed_settings(cfg, d.device), optim_config(cfg), cfg.max_steps, param_groups(model, cfg)
    )
    monitor = Monitor(
        Path(cfg.out), cfg.tensorboard and d.is_main, cfg.max_steps, cfg.batch_size * d.world_size, 1, cfg.max_steps
    )
    try:
        labeling = Labeling(cfg, model, tokenizer, d.device)
        step, best_step = fit(engine, labeling, train, val, monitor, d)
        calibration = labeling.calibrate(val) if cfg.calibrate else None
        metrics = final_metrics(labeling, {"train": train, "val": val, "test": test}, monitor, step)
    finally:
        monitor.close()
    metrics.update(steps=step, best_step=best_step, world_size=d.world_size, init=cfg.init, calibration=calibration)
    if d.is_main:
        save_labeler(cfg.out, model, tokenizer, cfg.model.max_length)
        atomic_write_text(Path(cfg.out) / "config.yaml", dump_yaml(cfg))
        atomic_write_json(Path(cfg.out) / "metrics.json", metrics)
        write_stamp(Path(cfg.out), labeler_fingerprint(cfg))
        log.info(
            "label train: AUC train %.4f val %.4f test %s → %s",
            metrics["train"]["auc"],
            metrics["val"]["auc"],
            figure(metrics.get("auc")),
            cfg.out,
        )
    barrier()
    return metrics


@dataclasses.dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations in a row without a validation AUC above the best by ``min_delta``."""

    patience: int
    min_delta: float
    best: float = float("-inf")
    best_step: int = 0
    stale: int = 0

    def update(self, step: int, auc: float) -> tuple[bool, bool]:
        """Record one evaluation: (is it the new best, should training stop now)."""
        if auc > self.best + self.min_delta or self.best_step == 0:
            self.best, self.best_step, self.stale = auc, step, 0
            return True, False
        self.stale += 1
        return False, self.stale >= self.patience


def earliest_stop(cfg: LabelTrainConfig) -> int:
    """The first step at which early stopping can end training: best at the first evaluation, then
    ``patience`` evaluations without a better one."""
    return (cfg.patience + 1) * cfg.eval_every


def fit(
    engine: DeepSpeedEngine, labeling: Labeling, train: TextSet, val: TextSet, monitor: Monitor, d: DistEnv
) -> tuple[int, int]:
    """Train until ``max_steps`` or early stopping; the model is left with its best validation weights.
    Returns (the last step trained, the best step)."""
    cfg, model = labeling.cfg, labeling.model
    sampler = PairSampler(train, cfg.seed + 1000 * d.rank)
    stopping, best_state = EarlyStopping(cfg.patience, cfg.min_delta), None
    if earliest_stop(cfg) >= cfg.max_steps and d.is_main:
        log.warning(
            "label train: early stopping cannot end training before max_steps=%d (patience %d × eval_every %d); "
            "raise max_steps or lower eval_every to let it",
            cfg.max_steps,
            cfg.patience,
            cfg.eval_every,
        )
    step = 0
    with Progress(cfg.max_steps, "label train", unit="step", enabled=d.is_main) as progress:
        for step in range(1, cfg.max_steps + 1):
            loss = labeling.loss(engine, train, sampler(cfg.batch_size // 2))
            engine.backward(loss)
            engine.step()
            progress.update()
            monitor.scalars("label", {"loss": loss.item()}, step)
            if step % cfg.eval_every and step != cfg.max_steps:
                continue
            val_auc = labeling.evaluate(val).auc
            monitor.scalars("label", {"val_auc": val_auc}, step)
            log.info("label train step %d: loss %.4f val AUC %.4f", step, loss.item(), val_auc)
            better, stop = stopping.update(step, val_auc)
            if better:
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if stop:
                log.info(
                    "label train: early stop at step %d (best val AUC %.4f at step %d)",
                    step,
                    stopping.best,
                    stopping.best_step,
                )
                break
    model.load_state_dict(best_state)
    return step, stopping.best_step


def final_metrics(labeling: Labeling, parts: dict[str, TextSet | None], monitor: Monitor, step: int) -> dict:
    """Pair statistics per part, logged at ``step`` (the last trained, so their curves do not jump back);
    ``auc`` and the counts at top level are the test split's."""
    metrics: dict = {}
    for name, texts in parts.items():
        if texts is None:
            continue
        stats = labeling.evaluate(texts)
        metrics[name] = stats.summary()
        monitor.scalars("label", {f"{name}_auc": stats.auc}, step)
        hardness = np.concatenate([1 - stats.p_pos, stats.p_neg])
        monitor.histograms(
            f"label/{name}", {"p_positive": stats.p_pos, "p_negative": stats.p_neg, "hardness": hardness}, step
        )
    top = metrics.get("test")
    if top:
        metrics.update(
            auc=top["auc"],
            texts=top["texts"],
            positive_pairs=top["positive_pairs"],
            negative_pairs=top["negative_pairs"],
        )
    else:
        metrics["auc"] = None
    return metrics
