"""Building and loading the model when ZeRO-3 partitions it: no rank ever holds the whole model.

Under ZeRO-3 (``partitioned_construction``) every module is built inside ``deepspeed.zero.Init``: each
layer's parameters are split across the ranks as soon as the layer exists, so a rank holds its
partition plus the layer being built. transformers towers take the same road through its own DeepSpeed
integration (``HfDeepSpeedConfig``): ``from_config`` initialises and ``from_pretrained`` loads layer by
layer. Weights from files (timm checkpoints, an fgcmr export) go in through ``load_into``, one module
at a time (``GatheredParameters``: that module's parameters gathered, written by rank 0, re-partitioned),
read lazily from the file (safetensors slices, memory-mapped torch files), never as a full copy per rank.

Random initialisation under ``zero.Init`` is each layer's own (its ``reset_parameters``); a model-wide
re-initialisation that timm runs after building (e.g. ViT's truncated normals) sees empty partitions
and is skipped, so from-scratch timm towers start from a different (still standard) init than
without ZeRO-3. Pretrained weights are the same either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


def zero3(ds_cfg: Mapping[str, Any] | None) -> bool:
    return bool(ds_cfg) and ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3


@contextlib.contextmanager
def partitioned_construction(ds_cfg: Mapping[str, Any] | None) -> Iterator[None]:
    """Modules built in this context are ZeRO-3-partitioned at birth when ``ds_cfg`` is stage 3, else plain.

    transformers sees ZeRO-3 through a global (weakly referenced) ``HfDeepSpeedConfig``, set for the
    construction only: left behind, it would partition the next model a process builds (tests build several).
    """
    if not zero3(ds_cfg):
        yield
        return
    import deepspeed
    import timm  # noqa: F401
    import torch._dynamo  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Imported first: zero.Init replaces torch.Tensor.__new__, and torch._dynamo (which timm pulls in through
    # torchvision) refuses to import under that patch (``Signature mismatch ... tensor_pynew``).

    hf = HfDeepSpeedConfig(dict(ds_cfg))  # noqa: F841 (alive while the towers are built)
    try:
        with deepspeed.zero.Init(config_dict_or_path=dict(ds_cfg)):
            yield
    finally:
        unset_hf_deepspeed_config()


def constructing_partitioned() -> bool:
    """Inside ``partitioned_construction`` (a ``deepspeed.zero.Init``) of a ZeRO-3 run."""
    import sys

    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return bool(zero and zero.zero_init_context)


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 holds only a partition of it (``p.shape`` is then ``(0,)``)."""
    return p.ds_shape if is_partitioned(p) else p.shape


def full_numel(p: torch.Tensor) -> int:
    return p.ds_numel if is_partitioned(p) else p.numel()


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds for ``p``: its partition under ZeRO-3 (plus padding), else all of them."""
    return p.ds_tensor.numel() if is_partitioned(p) else p.numel()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@contextlib.contextmanager
def gathered_for_writing(params: list[nn.Parameter]) -> Iterator[bool]:
    """The full ``params`` inside the block; yields whether this rank writes them (rank 0 under ZeRO-3,
    which then broadcasts and re-partitions them on exit)."""
    if not any(is_partitioned(p) for p in params):
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield _rank() == 0


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, strict: bool = True) -> int:
    """Copy ``state`` (module-relative names) into ``module``, one submodule at a time, partitioned or not.

    ``state`` may be lazy (``open_weights``): rank 0 reads each parameter once, every rank reads the
    (small, never partitioned) buffers. Shapes must agree; with ``strict`` every parameter and buffer
    must be in ``state``. Returns the number of tensors copied.
    """
    copied, missing = 0, []
    with torch.no_grad():
        for prefix, m in module.named_modules():
            dot = f"{prefix}." if prefix else ""
            params = [(n, p) for n, p in m.named_parameters(recurse=False)]
            present = [(n, p) for n, p in params if dot + n in state]
            missing += [dot + n for n, p in params if dot + n not in state]
            if present:
                with gathered_for_writing([p for _, p in present]) as write:
                    if write:
                        for n, p in present:
                            p.copy_(_checked(state[dot + n], p, dot + n, source))
                copied += len(present)
            for n, b in m.named_buffers(recurse=False):
                if b is None or n in m._non_persistent_buffers_set:
                    continue
                if dot + n not in state:
                    missing.append(dot + n)
                    continue
                b.copy_(_checked(state[dot + n], b, dot + n, source))
                copied += 1
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # BatchNorm counters, not weights
    if strict and missing:
        raise ValueError(f"{source}: no weights for {len(missing)} tensors, e.g. {missing[:3]}")
    return copied


def _checked(value: torch.Tensor, target: torch.Tensor, name: str, source: str | Path) -> torch.Tensor:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(
            f"{source}: tensor for {name} has shape {tuple(value.shape)}, the model needs {tuple(target.shape)}"
        )
    return value


class _SafetensorsFile(Mapping):
    """A safetensors file as a lazy state dict in file order: a tensor is read when it is looked up."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.offset_keys())
        self._known = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_weights(path: str | Path) -> Mapping[str, torch.Tensor]:
    """A weights file (.safetensors, or a torch file with the tensors at the top or under ``state_dict`` /
    ``model``) as a lazy mapping: safetensors read tensor by tensor, torch files memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
