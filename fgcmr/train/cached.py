"""Quick paired runs for the weighting ablation: a two-tower trained in one process on inputs cached in memory.

A pipeline run costs a minute (Wikipedia features) to five (pretrained towers on pixels) on 2 CPU cores,
mostly start-up and tower passes; an ablation needs dozens. Here the trainable part is a tower when it
reads features (Wikipedia's SIFT / LDA MLPs, trained whole) and only the projection when the tower is a
pretrained backbone: that backbone is frozen and run once over every image (eval transform, so no
augmentation) and every text. Otherwise as ``fgcmr train``: the model config, ``RetrievalLoss`` with the
labeler head and leave-one-out descriptions, AdamW parameter groups, warm-up + cosine schedule, gradient
clipping, the global batch (``micro_batch × nproc``), one random text per image per draw. No DeepSpeed,
no data workers. Scored by the eval's ``retrieval_metrics`` on every text of the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fgcmr.config import ConfigError, to_dict
from fgcmr.dataset import DatasetInfo, iter_records, sample_from_fields
from fgcmr.evaluate.metrics import retrieval_metrics
from fgcmr.io import atomic_open, clean_leftovers
from fgcmr.labels import read_head, read_head_with_identity
from fgcmr.losses import RetrievalLoss
from fgcmr.model.config import ModelConfig
from fgcmr.model.inputs import Inputs
from fgcmr.model.towers import build_image_tower, build_text_tower
from fgcmr.model.two_tower import _projection
from fgcmr.train.config import TrainConfig
from fgcmr.train.data import LabelJoin, key_id
from fgcmr.runtime.engine import param_groups, warmup_cosine

log = logging.getLogger("fgcmr.train.cached")
CHUNK = 64  # samples per frozen-tower forward while caching


@dataclasses.dataclass
class CachedSplit:
    """One split in memory: per image its (tower or frozen-tower) input, per text its input and labels."""

    image: torch.Tensor  # [N, d]
    text: torch.Tensor  # [M, e]
    owner: torch.Tensor  # [M] image index of each text
    category: torch.Tensor  # [N] (−1: none)
    image_id: torch.Tensor  # [N] stable ids (relevance falls back to them)
    label_text_emb: torch.Tensor | None = None  # [M, k] the labeler's embedding of each text
    desc_emb: torch.Tensor | None = None  # [M, k] leave-one-out description of the text's image
    has_desc: torch.Tensor | None = None  # [M]


def frozen(tower_kind: str) -> bool:
    return tower_kind not in ("feature", "tfidf")


def check_cacheable(cfg: ModelConfig) -> None:
    """Frozen towers must be pretrained: a randomly initialised backbone frozen would measure nothing."""
    if frozen(cfg.image.kind) and not (cfg.image.checkpoint or cfg.image.pretrained):
        raise ConfigError("cached training freezes the image tower: it needs pretrained weights (image.checkpoint)")
    if frozen(cfg.text.kind) and not cfg.text.pretrained_dir:
        raise ConfigError("cached training freezes the text tower: it needs pretrained weights (text.pretrained_dir)")


def cache_split(
    dataset: DatasetInfo, split: str, cfg: ModelConfig, labeler: str | None, cache_dir: Path | None = None
) -> CachedSplit:
    """Read a split once: feature inputs as they are, pretrained towers' outputs for the rest. With
    ``cache_dir`` the result is kept there, named by a hash of the manifest, split, model config and labeler
    head, so a later ablation on the same data skips the tower passes."""
    check_cacheable(cfg)
    if cache_dir is None:
        return _read_split(dataset, split, cfg, labeler)
    head = read_head_with_identity(dataset.root, labeler)[2] if labeler else ""
    ident = json.dumps([dataset.manifest, split, to_dict(cfg), labeler, head], sort_keys=True, default=str)
    path = Path(cache_dir) / f"{split}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        return CachedSplit(**torch.load(path))
    clean_leftovers(path.parent, name=path.name)  # a write killed before its rename (another split's may be going on)
    out = _read_split(dataset, split, cfg, labeler)
    with atomic_open(path) as f:
        torch.save(dataclasses.asdict(out), f)
    return out


@torch.no_grad()
def _read_split(dataset: DatasetInfo, split: str, cfg: ModelConfig, labeler: str | None) -> CachedSplit:
    inputs = Inputs(cfg, train=False)
    image_tower = build_image_tower(cfg.image).eval() if frozen(cfg.image.kind) else None
    text_tower = build_text_tower(cfg.text).eval() if frozen(cfg.text.kind) else None
    join = LabelJoin(dataset.root, labeler) if labeler else None
    images, texts, owner, category, ids, labels = [], [], [], [], [], []
    pending_images, pending_texts = [], []

    def flush() -> None:
        if pending_images:
            batch = torch.stack(pending_images)
            images.append(image_tower(batch) if image_tower is not None else batch)
            pending_images.clear()
        if pending_texts:
            batch = inputs.collate_texts(pending_texts)
            texts.append(text_tower(batch) if text_tower is not None else batch)
            pending_texts.clear()

    for url in dataset.shards(split):
        for key, fields in iter_records(url):
            sample = sample_from_fields(key, fields)
            pending_images.append(inputs.image(sample))
            pending_texts.extend(inputs.text(sample, k) for k in range(len(sample.texts)))
            owner.extend([len(category)] * len(sample.texts))
            category.append(sample.category_id)
            ids.append(key_id(key))
            if join is not None:
                labels.append(join(str(url), key)[0])
            if len(pending_images) >= CHUNK:
                flush()
    flush()
    out = CachedSplit(
        image=torch.cat(images).float(),
        text=torch.cat(texts).float(),
        owner=torch.tensor(owner, dtype=torch.long),
        category=torch.tensor(category, dtype=torch.long),
        image_id=torch.tensor(ids, dtype=torch.long),
    )
    if labels:
        out.label_text_emb, out.desc_emb, out.has_desc = leave_one_out(labels)
    log.info("cached %s/%s: %d images, %d texts", dataset.root.name, split, len(out.image), len(out.text))
    return out


def leave_one_out(per_image: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per text: its labeler embedding, the mean of its image's other texts, and whether there are any
    (the ``fgcmr.labels.join_labels`` definition, for every text at once)."""
    text, desc, has = [], [], []
    for t in per_image:
        t = t.astype(np.float32)
        n = len(t)
        text.append(t)
        desc.append((t.sum(0, keepdims=True) - t) / (n - 1) if n > 1 else t)
        has.append(np.full(n, float(n > 1), dtype=np.float32))
    return (torch.from_numpy(np.concatenate(x)) for x in (text, desc, has))


class Trainable(nn.Module):
    """What a cached run trains: feature towers with their projections, or projections over frozen outputs."""

    def __init__(self, cfg: ModelConfig, image_dim: int, text_dim: int):
        super().__init__()
        self.image_tower = build_image_tower(cfg.image) if not frozen(cfg.image.kind) else nn.Identity()
        self.text_tower = build_text_tower(cfg.text) if not frozen(cfg.text.kind) else nn.Identity()
        self.image_proj = _projection(getattr(self.image_tower, "out_dim", image_dim), cfg)
        self.text_proj = _projection(getattr(self.text_tower, "out_dim", text_dim), cfg)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_proj(self.image_tower(x)), dim=-1)

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_proj(self.text_tower(x)), dim=-1)

    def tower_parameters(self) -> set[int]:  # for ``param_groups``: towers take lr × tower_lr_mult
        return {id(p) for tower in (self.image_tower, self.text_tower) for p in tower.parameters()}


def train_and_score(
    cfg: TrainConfig, model_cfg: ModelConfig, train: CachedSplit, test: CachedSplit, dataset: DatasetInfo, nproc: int
) -> dict:
    """Train from seed ``cfg.seed`` on ``train`` (global batch ``micro_batch × nproc``) and score ``test``."""
    torch.manual_seed(cfg.seed)
    model = Trainable(model_cfg, train.image.shape[1], train.text.shape[1])
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, foreach=True
    )
    batch = cfg.data.micro_batch * nproc * cfg.optim.grad_accum
    n = len(train.image)
    if batch > n:
        raise ConfigError(f"global batch {batch} exceeds the {n} training images")
    total = cfg.max_steps or cfg.epochs * max(1, (cfg.data.samples_per_epoch or n) // batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    )
    head = None
    if cfg.loss.needs_labels:
        if train.desc_emb is None:
            raise ConfigError("the weighted loss needs label sidecars: cache the split with its labeler")
        w, c = read_head(dataset.root, cfg.labels)
        head = (torch.from_numpy(w), c)
    loss_fn = RetrievalLoss(cfg.loss, head)
    if not torch.equal(train.owner, torch.sort(train.owner).values):
        raise ValueError("cached texts must be stored image by image")
    count = torch.bincount(train.owner, minlength=n)
    first = torch.cumsum(count, 0) - count  # texts are stored image by image (``cache_split``)
    rng = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(n, generator=rng), 0
    model.train()
    for _ in range(total):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=rng), 0
        idx = order[pos : pos + batch]
        pos += batch
        pick = first[idx] + (torch.rand(len(idx), generator=rng) * count[idx]).long()
        fields = {"category": train.category[idx], "image_id": train.image_id[idx]}
        if head is not None:
            fields.update(label_text_emb=train.label_text_emb[pick], desc_emb=train.desc_emb[pick])
            fields["has_desc"] = train.has_desc[pick]
        out = loss_fn(model.encode_image(train.image[idx]), model.encode_text(train.text[pick]), fields)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_image(test.image), model.encode_text(test.text)
    metrics = retrieval_metrics(img.numpy(), txt.numpy(), test.category.numpy(), test.owner.numpy())
    return {k: v for k, v in metrics.items() if not k.startswith("pr_")} | {"steps": total}
