"""Mixed precision and ZeRO-3 for real: every shipped DeepSpeed config trains, bf16 tracks fp32, ZeRO-3
builds partitioned, loads pretrained weights partitioned, and resumes exactly (one 2-rank launch of
``tests/zero_worker.py``), plus the single-process dtype plumbing."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fgcmr.launch import local_rank_envs
from fgcmr.model import build_model
from fgcmr.model.partitioned import load_into, open_weights
from fgcmr.text import ensure_tokenizer
from fgcmr.config import CONFIGS
from fgcmr.train.config import load_model_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = ensure_tokenizer(["a red circle", "two blue squares"] * 10, tmp_path_factory.mktemp("tok") / "tok", 120, 0)
    cfg = load_model_config("tiny")
    return dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, tokenizer_dir=str(tok), config={**cfg.text.config, "vocab_size": 120})
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_as_deepspeed_casts_it(tiny, dtype):
    """DeepSpeed casts parameters only (buffers stay fp32): BatchNorms still run (in fp32), embeddings come out
    fp32 and unit length, gradients reach every parameter in its dtype, and eval outputs track fp32's."""
    torch.manual_seed(0)
    ref = build_model(tiny).eval()
    half = copy.deepcopy(ref)
    for p in half.parameters():
        p.data = p.data.to(dtype)
    assert {b.dtype for b in half.buffers() if b.is_floating_point()} == {torch.float32}
    images, ids = torch.randn(4, 3, 64, 64), torch.randint(5, 120, (4, 12))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    img, txt, scale = half(images.to(dtype), text)
    assert img.dtype == txt.dtype == scale.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    ref_img, ref_txt, _ = ref(images, text)
    assert (img - ref_img).abs().max() < 0.05 and (txt - ref_txt).abs().max() < 0.05
    half.train()
    img, txt, _ = half(images.to(dtype), text)
    (img @ txt.T).sum().backward()
    grads = [p.grad for n, p in half.named_parameters() if n != "logit_scale"]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_load_into_checks_names_and_shapes(tiny, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_model(tiny)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    target = build_model(tiny)
    assert load_into(target, open_weights(tmp_path / "w.safetensors"), "w") == len(source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    state = dict(source.state_dict())
    state["image_proj.0.weight"] = state["image_proj.0.weight"][:, :3]
    with pytest.raises(ValueError, match="image_proj.0.weight has shape"):
        load_into(target, state, "bad")
    del state["image_proj.0.weight"]
    with pytest.raises(ValueError, match="no weights for 1 tensors"):
        load_into(target, state, "bad")


def test_fp16_refused_where_deepspeed_cannot_run_it():
    from deepspeed.accelerator import get_accelerator

    from fgcmr.config import ConfigError
    from fgcmr.runtime.optim import OptimConfig
    from fgcmr.runtime.engine import check_supported, deepspeed_config

    check_supported(deepspeed_config("zero2_bf16", 2, OptimConfig()))
    if get_accelerator().is_fp16_supported():
        pytest.skip("this device runs fp16")
    with pytest.raises(ConfigError, match="use a \\*_bf16 or \\*_fp32"):
        check_supported(deepspeed_config("zero2_fp16", 2, OptimConfig()))


@pytest.mark.slow
def test_every_config_trains_and_zero3_is_partitioned(tmp_path):
    procs = []
    for rank, rank_env in enumerate(local_rank_envs(2)):
        env = dict(os.environ, **rank_env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "zero_worker.py"), str(tmp_path), "1500"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    codes = [p.wait(timeout=1800) for p in procs]  # hang guard only: the worker dumps its stacks and exits first
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-5000:]
    check_result(json.loads((tmp_path / "result.json").read_text()))
    export_streams_as_whole_gather(tmp_path / "work" / "ckpt", tmp_path)


def export_streams_as_whole_gather(ckpt: Path, tmp_path: Path) -> None:
    """The worker's real 2-rank ZeRO-3 checkpoint: the export streamed tensor by tensor is the file that
    DeepSpeed's whole-model gather gives when safetensors saves it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    from test_export_stream import assert_same_file

    from fgcmr.model.streaming import write_safetensors
    from fgcmr.train.tags import latest_tag
    from fgcmr.train.export import checkpoint_tensors

    tag = latest_tag(ckpt)
    stats = write_safetensors(tmp_path / "streamed.safetensors", checkpoint_tensors(ckpt, tag), {"format": "pt"})
    whole = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    whole = {k: v.float().contiguous() for k, v in whole.items()}
    save_file(whole, str(tmp_path / "whole.safetensors"), {"format": "pt"})
    assert stats["tensors"] == len(whole) > 50
    assert_same_file(tmp_path / "streamed.safetensors", tmp_path / "whole.safetensors")


def check_result(result: dict) -> None:

    configs = result["configs"]
    shipped = sorted(p.stem for p in (CONFIGS / "deepspeed").glob("*.json"))
    assert set(shipped) <= set(configs) and len(shipped) >= 15
    for name in shipped:
        r = configs[name]
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]), (name, r)
        assert r["zero_stage"] == int(name[4]), name
        want = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[name.split("_")[1]]
        assert r["param_dtypes"] == [want], (name, r)
        assert r["forced_fp16"] == ("fp16" in name and not configs["fp16_native"])
    for name in shipped:  # the same steps from the same weights give fp32's losses, in bf16/fp16 nearly
        # (ZeRO-3 against ZeRO-3: building under zero.Init draws other random numbers, so dropout masks differ)
        ref = configs["zero3_fp32" if name.startswith("zero3") else "zero0_fp32"]["losses"]
        tol = 1e-4 if "fp32" in name else 0.01
        assert max(abs(a - b) for a, b in zip(configs[name]["losses"], ref)) < tol, (name, configs[name]["losses"], ref)

    zero3, whole = result["construction"]["zero3"], result["construction"]["whole"]
    assert zero3["tower_classes"] == whole["tower_classes"] == ["ResNet", "BertModel"]
    assert whole["peak"] == whole["total"] == zero3["total"] and not whole["all_partitioned"]
    assert zero3["all_partitioned"]
    assert zero3["peak"] < 0.5 * zero3["total"] + zero3["largest_layer"] + 1024, (
        zero3
    )  # a partition + the layer being built
    assert zero3["after"] <= 0.5 * zero3["total"] + 2 * 1024  # each rank keeps its half (plus padding)

    for case, r in result["pretrained"].items():
        assert r["tensors"] > 50 and r["equal"], (case, r)
        assert r.get("equal_source", True), (case, r)

    resume = result["resume"]
    assert resume["client_step"] == 2 and resume["resumed"] == resume["straight"], resume


def test_expected_bytes_per_param_follow_the_zero_paper():
    from fgcmr.bench.memory import expected_bytes_per_param as b

    assert [b(s, True, 1) for s in range(4)] == [16, 16, 16, 16]
    assert [b(s, True, 4) for s in range(4)] == [16, 7, 5.5, 4]  # 2+2+12/4, 2+14/4, 16/4
    assert [b(s, False, 2) for s in range(4)] == [16, 12, 10, 8]


def test_census_counts_16_bytes_per_param_without_zero_and_checkpointing_cuts_saved_activations():
    """The census of a plain AdamW step (what stage 0 fp32 holds): 4 B weights + 4 B grads + 8 B Adam, each
    storage once; saved activations fall with checkpointing (non-reentrant, as the towers use it)."""
    import types

    from torch.utils.checkpoint import checkpoint

    from fgcmr.bench.memory import saved_activations, scaling, tensor_census

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)) for _ in range(4)
    )
    opt = torch.optim.AdamW(blocks.parameters())
    x = torch.randn(64, 256)

    def forward(ckpt: bool) -> torch.Tensor:
        h = x
        for b in blocks:
            h = checkpoint(b, h, use_reentrant=False) if ckpt else b(h)
        return h.square().mean()

    with saved_activations() as plain:
        loss = forward(False)
    loss.backward()
    opt.step()
    with saved_activations() as ckpt:
        forward(True).backward()
    n = sum(p.numel() for p in blocks.parameters())
    census = tensor_census(types.SimpleNamespace(module=blocks, optimizer=opt), exclude=[x])
    assert census["params"] == census["grads"] == 4 * n
    assert 8 * n <= census["optimizer"] <= 8 * n + 8 * len(opt.state)  # two moments (+ Adam's step counters)
    assert plain["bytes"] >= 4 * 64 * (1024 * 2 + 256) * 4  # per block: input, pre- and post-GELU
    assert ckpt["bytes"] <= 5 * 64 * 256 * 4 + 1024 < plain["bytes"] / 2  # each block's input, the output
    runs = [{"nproc": n, "ranks": [{"model_state_mb": m, "model_state_rss_mb": 2 * m}]} for n, m in ((1, 10), (2, 5))]
    assert scaling(runs) == {"ratio": 0.5, "ratio_rss": 0.5, "ranks": [1, 2]}
