"""``fgcmr label train``: fit the siamese labeler on text pairs of the train split.

Each rank draws a batch of anchor texts plus, for every anchor, one partner text of the same group
(category, or image without categories), so every batch holds positives. Scores of every in-batch
pair across all ranks form the logits; the loss is binary cross-entropy with positives and negatives
weighted equally. A validation part carved from the train split (whole images) drives early stopping
(an evaluation counts as better only by ``min_delta``), so the labeler does not memorise the pairs whose
hardness it will later report; then the head's scale and offset are calibrated on that held-out part
(Platt scaling), since the training pairs' scores are overconfident. ROC-AUC on train, validation and
test goes to ``metrics.json`` and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fgcmr.config import ConfigError, dump_yaml
from fgcmr.dataset import open_dataset
from fgcmr.distributed import DistEnv, all_gather_with_grad, barrier, init
from fgcmr.io import atomic_write_json, atomic_write_text
from fgcmr.run import Check, Fingerprint, check_stamp, clear_stamp, file_hash, fingerprint, write_stamp
from fgcmr.label.encode import embed_texts
from fgcmr.label.metrics import PairStats, fit_platt, pair_stats, subsample
from fgcmr.label.model import EncoderConfig, SiameseLabeler, autocast, build_encoder, save_labeler, tokenize
from fgcmr.label.texts import TextSet, read_texts
from fgcmr.text import load_tokenizer, train_wordpiece
from fgcmr.labels import relevance
from fgcmr.progress import Progress, figure

log = logging.getLogger("fgcmr.label")


@dataclasses.dataclass
class LabelTrainConfig:
    shards: str = ""  # dataset dir (fgcmr shard output)
    out: str = ""  # labeler dir written
    init: str | None = None  # local pretrained encoder dir (its tokenizer is used unless --tokenizer)
    tokenizer: str | None = None  # local tokenizer dir; default: trained on the train split
    vocab_size: int = 8000  # size of a tokenizer trained on the train split
    model: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    batch_size: int = 32  # texts per rank and step: batch_size / 2 anchors + one partner each
    lr: float = 5e-4  # projection and head
    encoder_lr: float | None = None  # default: lr
    freeze_layers: int = 0  # freeze the embeddings and the first N encoder layers (-1: the whole encoder)
    weight_decay: float = 0.01  # AdamW weight decay
    max_steps: int = 1000  # optimizer steps at most (early stopping may end sooner)
    warmup_steps: int = 20  # linear lr warmup steps
    eval_every: int = 50  # steps between validation AUCs
    patience: int = 4  # evaluations without a better validation AUC before stopping
    min_delta: float = 0.001  # a validation AUC must beat the best by this much to count as better
    calibrate: bool = True  # fit the head's scale and offset on held-out pairs (Platt scaling) after training
    val_fraction: float = 0.1  # share of the train split (whole images) held out for validation
    max_eval_texts: int = 1500  # texts per AUC evaluation at most (subsampled)
    eval_batch_size: int = 64  # texts per forward when evaluating
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # compute precision; auto: fp32 on CPU, bf16 on CUDA
    train_split: str = "train"  # the split it trains on
    test_split: str = "test"  # the split the test AUC is measured on
    test_fraction: float = 0.0  # > 0: carve the test part from the train split instead (data sets with one split)
    seed: int = 0  # seed of the carve, the batches and the initial weights
    tensorboard: bool = True  # write TensorBoard scalars under <out>/tensorboard
    threads: int | None = None  # torch CPU threads per rank (default: cores / local ranks)

    def validate(self) -> None:
        if not self.shards or not self.out:
            raise ValueError("--shards=<dataset dir> and --out=<labeler dir> are required")
        if self.batch_size < 4 or self.batch_size % 2:
            raise ValueError(f"batch_size={self.batch_size} must be even and ≥ 4")
        if not 0 < self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} must lie in (0, 1) and test_fraction={self.test_fraction} in [0, 1)"
            )


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


def gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


def freeze(model: SiameseLabeler, layers: int) -> None:
    """Stop gradients below layer ``layers`` (BERT-family names: ``embeddings.*``, ``encoder.layer.<i>.*``).

    Fine-tuning only the top of a pretrained encoder keeps most of what it knows and makes a step
    several times cheaper, since backward stops at the first trainable layer.
    """
    if layers == 0:
        return
    for name, p in model.encoder.named_parameters():
        parts = name.split(".")
        low = parts[0] == "embeddings" or (parts[:2] == ["encoder", "layer"] and int(parts[2]) < layers)
        if layers < 0 or low:
            p.requires_grad_(False)


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """All-reduce every gradient in one flat buffer (parameters without a gradient, e.g. an unused pooler, skip)."""
    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train_step(
    model: SiameseLabeler, texts: TextSet, idx: np.ndarray, tokenizer, cfg: LabelTrainConfig, d: DistEnv
) -> torch.Tensor:
    """Loss of one batch: local rows against the texts of every rank."""
    batch = tokenize(tokenizer, [texts.texts[i] for i in idx], cfg.model.max_length)
    with autocast(d.device, cfg.dtype):
        emb = model(**{k: v.to(d.device) for k, v in batch.items()})
    all_emb = all_gather_with_grad(emb)
    meta = torch.from_numpy(np.stack([texts.category[idx], texts.image[idx], idx])).to(d.device)
    all_meta = gather(meta.T.contiguous()).T
    y = relevance(meta[0], all_meta[0], meta[1], all_meta[1])
    valid = meta[2, :, None] != all_meta[2]  # a text paired with itself says nothing
    return balanced_bce(model.logits(emb, all_emb), y, valid)


def evaluate(model: SiameseLabeler, tokenizer, texts: TextSet, cfg: LabelTrainConfig, d: DistEnv) -> PairStats:
    model.eval()
    sub = subsample(texts, cfg.max_eval_texts, cfg.seed)
    emb = embed_texts(model, tokenizer, sub.texts, cfg.model.max_length, cfg.eval_batch_size, d.device, cfg.dtype)
    model.train()
    return pair_stats(emb, sub, model.w, model.c)


def make_tokenizer(cfg: LabelTrainConfig, train: TextSet, d: DistEnv):
    """A given tokenizer, the pretrained encoder's, or one trained on the train texts (rank 0 trains, all load)."""
    source = cfg.tokenizer or cfg.init
    if source:
        return load_tokenizer(source)
    path = Path(cfg.out) / "tokenizer"
    if d.is_main:
        train_wordpiece(train.texts, cfg.vocab_size).save_pretrained(path)
    barrier()
    return load_tokenizer(path)


def lr_lambda(cfg: LabelTrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (
            1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)))
        )

    return f


def labeler_fingerprint(cfg: LabelTrainConfig) -> Fingerprint:
    """The config, the dataset and the tokenizer it is given (``init`` is a path in the config)."""
    inputs = {
        "manifest": file_hash(Path(cfg.shards) / "manifest.json"),
        "tokenizer": file_hash(Path(cfg.tokenizer) / "tokenizer.json") if cfg.tokenizer else None,
    }
    return fingerprint("label", cfg, inputs, ("out", "threads", "tensorboard"))


def done(cfg: LabelTrainConfig) -> Check:
    return check_stamp(Path(cfg.out), labeler_fingerprint(cfg), "labeler")


def run(cfg: LabelTrainConfig) -> dict:
    d = init(cfg.threads)
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
    head = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    trainable = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": trainable, "lr": cfg.encoder_lr or cfg.lr}, {"params": head, "lr": cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    tb = _writer(cfg, d)
    sampler = PairSampler(train, cfg.seed + 1000 * d.rank)
    best_auc, best_state, best_step, stale = float("nan"), None, 0, 0
    step = 0
    with Progress(cfg.max_steps, "label train", unit="step", enabled=d.is_main) as progress:
        for step in range(1, cfg.max_steps + 1):
            loss = train_step(model, train, sampler(cfg.batch_size // 2), tokenizer, cfg, d)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model, d.world_size)
            optimizer.step()
            scheduler.step()
            progress.update()
            if tb:
                tb.add_scalar("label/loss", loss.item(), step)
            if step % cfg.eval_every and step != cfg.max_steps:
                continue
            val_auc = evaluate(model, tokenizer, val, cfg, d).auc
            if tb:
                tb.add_scalar("label/val_auc", val_auc, step)
            log.info("label train step %d: loss %.4f val AUC %.4f", step, loss.item(), val_auc)
            if best_state is None or val_auc > best_auc + cfg.min_delta:
                best_auc, best_step, stale = val_auc, step, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info(
                        "label train: early stop at step %d (best val AUC %.4f at step %d)", step, best_auc, best_step
                    )
                    break
    model.load_state_dict(best_state)
    calibration = calibrate(model, tokenizer, val, cfg, d) if cfg.calibrate else None
    metrics = _final_metrics(model, tokenizer, {"train": train, "val": val, "test": test}, cfg, d, tb, step)
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
    if tb:
        tb.close()
    barrier()
    return metrics


def calibrate(model: SiameseLabeler, tokenizer, val: TextSet, cfg: LabelTrainConfig, d: DistEnv) -> dict:
    """Platt-scale the head on the held-out part: ``w ← a·w``, ``c ← a·c + b`` (every rank computes the same)."""
    model.eval()
    sub = subsample(val, cfg.max_eval_texts, cfg.seed)
    emb = embed_texts(
        model, tokenizer, sub.texts, cfg.model.max_length, cfg.eval_batch_size, d.device, cfg.dtype
    ).float()
    model.train()
    with torch.no_grad():
        z = model.logits(emb.to(d.device), emb.to(d.device)).float().cpu()
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


def _final_metrics(
    model, tokenizer, parts: dict[str, TextSet | None], cfg: LabelTrainConfig, d: DistEnv, tb, step: int
) -> dict:
    """Pair statistics per part, logged at the last step; ``auc`` and the counts at top level are the test split's."""
    metrics: dict = {}
    for name, texts in parts.items():
        if texts is None:
            continue
        stats = evaluate(model, tokenizer, texts, cfg, d)
        metrics[name] = stats.summary()
        if tb:
            tb.add_scalar(f"label/{name}_auc", stats.auc, step)
            tb.add_histogram(f"label/{name}/p_positive", stats.p_pos, step)
            tb.add_histogram(f"label/{name}/p_negative", stats.p_neg, step)
            tb.add_histogram(f"label/{name}/hardness", np.concatenate([1 - stats.p_pos, stats.p_neg]), step)
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


def _writer(cfg: LabelTrainConfig, d: DistEnv):
    if not (cfg.tensorboard and d.is_main):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(cfg.out) / "tensorboard"))
