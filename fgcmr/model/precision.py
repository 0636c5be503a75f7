"""Mixed precision for the towers: what DeepSpeed's bf16/fp16 cast leaves inconsistent, made consistent.

DeepSpeed casts a model's parameters to bf16/fp16 but keeps its buffers in fp32 (0.19: "preserve fp32
buffers"), so a BatchNorm ends up with half-precision weights and fp32 running statistics, a mix
``torch.batch_norm`` rejects on CPU and CUDA (``expected scalar type BFloat16 but found Float``).
BatchNorm is also the layer that should not run in half precision (its variance of a batch and its
running averages lose most of their digits), so ``fp32_batch_norms`` makes every BatchNorm compute in
fp32 from a low-precision input: its input and (differentiable) copies of its weights are cast up,
its output back to the input's dtype, and its running statistics are kept in fp32 (``zero.Init`` creates
every floating tensor in the training dtype). In fp32 the layer is untouched. The state dict is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

_CLASSES: dict[type, type] = {}


class _Fp32Norm:
    """Mixin put in front of a ``_BatchNorm`` subclass (timm's ``BatchNormAct2d`` included)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, "weight", None)
        if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
            return super().forward(x)
        params = dict(self._parameters)
        try:
            for name, p in params.items():
                if p is not None:
                    self._parameters[name] = p.float()  # a differentiable fp32 view for this call only
            return super().forward(x.float()).to(x.dtype)
        finally:
            self._parameters.update(params)


def _fp32_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_Fp32Norm, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def fp32_batch_norms(module: nn.Module) -> int:
    """Make every BatchNorm in ``module`` compute in fp32 (in place); returns how many there are."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not isinstance(m, _Fp32Norm):
                m.__class__ = _fp32_class(type(m))
            for b in m.buffers(recurse=False):
                if b.is_floating_point():
                    b.data = b.data.float()
            count += 1
    return count
