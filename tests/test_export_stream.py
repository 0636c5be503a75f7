"""Streaming export: the safetensors file written tensor by tensor is the one safetensors writes, and a
ZeRO-3 checkpoint streams into it with extra memory bounded by one tensor, not the model.
(The same comparison on a real 2-rank ZeRO-3 checkpoint runs in ``tests/test_zero.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fgcmr.model.streaming import write_safetensors
from fgcmr.train.export import checkpoint_tensors

MB = 2**20


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def assert_same_file(ours: Path, theirs: Path) -> None:
    """Same header (as JSON) and the same data bytes."""
    (h1, d1), (h2, d2) = read_safetensors(ours), read_safetensors(theirs)
    assert h1 == h2 and d1 == d2
    assert (ours.stat().st_size - len(d1) - 8) % 8 == 0  # header padded: data 8-byte aligned


def test_streamed_file_is_what_safetensors_writes(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    state = {
        "b.weight": torch.randn(7, 5, generator=g),
        "a.bias": torch.randn(3, generator=g, dtype=torch.float64),  # written as float32, like every export
        "z.count": torch.tensor(4),  # 0-dim integer buffer → float32
        "e.empty": torch.zeros(0, 4),
        "t.half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
    }
    meta = {"format": "pt", "model_config": json.dumps({"name": "é", "x": [1, 2]})}
    stats = write_safetensors(tmp_path / "ours.safetensors", state, meta)
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp_path / "ref.safetensors"), metadata=meta)
    assert_same_file(tmp_path / "ours.safetensors", tmp_path / "ref.safetensors")
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(loaded[k], v.float()) for k, v in state.items())
    assert stats["tensors"] == 5 and stats["largest"] == 35 * 4
    header = (tmp_path / "ours.safetensors").read_bytes()[8:200].decode(errors="ignore")
    assert header.startswith('{"__metadata__"')  # keys sorted: the same bytes from every process


def fake_zero3_checkpoint(ckpt: Path, shapes: dict[str, tuple[int, ...]], world: int, seed: int) -> None:
    """A ZeRO-3 checkpoint tag as DeepSpeed writes it (per rank: model-state file with the parameter
    shapes, optimizer file with the rank's flat fp32 partition of every parameter, padded to equal parts)."""
    import deepspeed
    from deepspeed.checkpoint import constants as C

    tag = ckpt / "global_step1"
    tag.mkdir(parents=True)
    (ckpt / "latest").write_text("global_step1")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for shape in shapes.values():
        flat = torch.randn(shape, generator=g).reshape(-1)
        part = -(-flat.numel() // world)
        flat = torch.cat([flat, flat.new_zeros(part * world - flat.numel())])
        for r in range(world):
            parts[r].append(flat[r * part : (r + 1) * part])
    for r in range(world):
        model_state = {
            "module": {},
            C.BUFFER_NAMES: [],
            C.PARAM_SHAPES: [{k: torch.Size(s) for k, s in shapes.items()}],
            "shared_params": {},
            C.DS_VERSION: deepspeed.__version__,
            C.FROZEN_PARAM_SHAPES: None,
            C.FROZEN_PARAM_FRAGMENTS: None,
        }
        torch.save(model_state, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        optim = {C.ZERO_STAGE: 3, C.PARTITION_COUNT: world, C.FP32_FLAT_GROUPS: [torch.cat(parts[r])]}
        torch.save({C.OPTIMIZER_STATE_DICT: optim}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


def test_zero3_checkpoint_streams_with_memory_bounded_by_one_tensor(tmp_path):
    """64 MB of weights over 2 ranks' partitions: the streamed export equals DeepSpeed's whole gather, and
    the most extra (anonymous) memory it ever holds is about one 4 MB tensor (file pages of the
    memory-mapped partitions are the kernel's to drop), not the model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    shapes = {f"layer{i:02d}.weight": (1024, 1024) for i in range(16)} | {"head.bias": (7,)}
    fake_zero3_checkpoint(tmp_path / "ckpt", shapes, world=2, seed=0)
    total = sum(torch.Size(s).numel() * 4 for s in shapes.values())

    lazy = checkpoint_tensors(tmp_path / "ckpt", "global_step1")
    assert list(lazy) == list(shapes) and all(tuple(lazy[k].shape) == s for k, s in shapes.items())
    stats = write_safetensors(tmp_path / "streamed.safetensors", lazy, {"format": "pt"})
    largest = 1024 * 1024 * 4
    assert stats["bytes"] == total and stats["largest"] == largest
    assert stats["peak_extra"] is not None
    assert stats["peak_extra"] <= largest + 4 * MB, stats  # one tensor at a time
    assert stats["peak_extra"] < total / 8, stats  # never the model

    whole = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), tag="global_step1")
    save_file({k: v.contiguous() for k, v in whole.items()}, str(tmp_path / "whole.safetensors"), {"format": "pt"})
    assert_same_file(tmp_path / "streamed.safetensors", tmp_path / "whole.safetensors")
    g = torch.Generator().manual_seed(0)  # and the weights are those the partitions were cut from
    first = torch.randn(shapes["layer00.weight"], generator=g)
    assert torch.equal(whole["layer00.weight"], first)


def test_skeleton_has_the_model_s_tensors_and_checks_a_checkpoint_against_them():
    import pytest

    from fgcmr.model import build_model
    from fgcmr.model.export import skeleton
    from fgcmr.train.config import load_model_config
    from fgcmr.train.export import check_tensors

    cfg = load_model_config("tiny")
    meta, real = skeleton(cfg), build_model(cfg)
    assert {p.device.type for p in meta.state_dict().values()} == {"meta"}
    want = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == want
    state = real.state_dict()
    check_tensors(meta, state, Path("ckpt"))
    with pytest.raises(ValueError, match="missing \\['image_proj.0.weight'\\]"):
        check_tensors(meta, {k: v for k, v in state.items() if k != "image_proj.0.weight"}, Path("ckpt"))
    with pytest.raises(ValueError, match="image_proj.0.weight has shape"):
        check_tensors(meta, {**state, "image_proj.0.weight": torch.zeros(1)}, Path("ckpt"))
