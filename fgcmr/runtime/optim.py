"""The optimizer and learning-rate schedule settings of the training runtime (``fgcmr.runtime.engine``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # AdamW weight decay
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: float = 1e-6  # AdamW eps
    warmup_steps: int = 20  # linear warmup steps before the cosine decay
    min_lr_ratio: float = 0.0  # cosine decays to lr × this
    tower_lr_mult: float = 1.0  # lr multiplier of the (pretrained) towers vs the new projection heads
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # 0 disables
