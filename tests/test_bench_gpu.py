"""The GPU benchmark: its FLOP count, its peak table, its configs, and a short CPU run of the whole thing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fgcmr.bench import gpu
from fgcmr.config import load_config
from fgcmr.model import build_model
from waits import run_following

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "bench"


class Linear2Tower(nn.Module):
    """Two bias-free linear towers over features: every FLOP is known in closed form."""

    def __init__(self, d_img: int, d_txt: int, d: int):
        super().__init__()
        self.image, self.text = nn.Linear(d_img, d, bias=False), nn.Linear(d_txt, d, bias=False)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, image, text):
        return self.image(image), self.text(text), self.scale * 1.0


def test_flop_count_is_exact_for_linear_towers():
    d_img, d_txt, d, n = 12, 6, 8, 2
    batch = {"image": torch.randn(5, d_img), "text": torch.randn(5, d_txt)}
    per_sample = gpu.count_flops(Linear2Tower(d_img, d_txt, d), batch, torch.device("cpu"), samples=n)
    towers = 2 * (2 * n * d_img * d) + 2 * (2 * n * d_txt * d)  # forward + weight gradient (inputs need none)
    similarity = 3 * (2 * n * n * d)  # image @ text.T and its two input gradients
    assert per_sample == (towers + similarity) / n


def test_flop_count_leaves_no_gradients():
    model = Linear2Tower(4, 4, 4)
    gpu.count_flops(model, {"image": torch.randn(3, 4), "text": torch.randn(3, 4)}, torch.device("cpu"))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 156.0),
        ("Tesla T4", torch.bfloat16, None),
    ],
)
def test_peak_table_matches_device_names(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu.peak_tflops(torch.device("cuda", 0), dtype) == peak
    assert gpu.peak_tflops(torch.device("cpu"), dtype) is None


def test_h200_config_is_vit_l14_and_bert_base_in_bf16_zero2():
    cfg = load_config(gpu.BenchGpuConfig, str(CONFIGS / "gpu_h200.yaml"), {})
    assert cfg.model.image.name == "vit_large_patch14_clip_224" and cfg.deepspeed == "zero2_bf16"
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(cfg.model)
    image = sum(p.numel() for p in model.image_tower.parameters())
    text = sum(p.numel() for p in model.text_tower.parameters())
    assert 300e6 < image < 310e6  # ViT-L/14
    assert 105e6 < text < 112e6  # BERT-base (no pooler)


def test_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="modes"):
        load_config(gpu.BenchGpuConfig, str(CONFIGS / "gpu_tiny_cpu.yaml"), {"modes": ["synthetic", "disk"]})


@pytest.mark.slow
def test_tiny_cpu_run_reports_both_modes_and_a_table(synthetic_dataset, tmp_path):
    code = (
        "from fgcmr.bench.gpu import BenchGpuConfig, run; from fgcmr.config import load_config; "
        f"run(load_config(BenchGpuConfig, {str(CONFIGS / 'gpu_tiny_cpu.yaml')!r}, "
        f"{{'shards': {str(synthetic_dataset)!r}, 'steps': 2, 'micro_batch': 8, "
        f"'out': {str(tmp_path)!r}, 'peak_tflops': 0.5}}))"
    )
    res = run_following(
        [sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert (tmp_path / "config.yaml").is_file()
    assert (
        list(result["modes"]) == ["synthetic", "shards"] and result["device"] == "cpu" and result["dtype"] == "float32"
    )
    for r in result["modes"].values():
        assert r["samples_per_s"] > 0 and r["step_time_s"] > 0 and 0 <= r["data_wait_frac"] < 1
        assert r["peak_memory_mb"] > 100  # process RSS: torch alone is more
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
    synthetic, shards = (
        result["modes"]["synthetic"]["gflops_per_sample"],
        result["modes"]["shards"]["gflops_per_sample"],
    )
    assert 0 < shards <= synthetic  # shard texts are padded to the batch's longest, synthetic ones to max_length
    lines = res.stdout.strip().splitlines()
    assert lines[-3].split()[:2] == ["mode", "samples/s"] and lines[-1].startswith("shards")


def test_h200_config_measures_the_large_model_under_zero3_bf16_too():
    cfg = load_config(gpu.BenchGpuConfig, str(CONFIGS / "gpu_h200.yaml"), {})
    cfg.validate()
    [case] = cfg.cases
    large = gpu.case_config(cfg, case)
    assert case["name"] == "large-zero3-bf16" and large.deepspeed == "zero3_bf16" and not large.cases
    assert large.model.image.name == "vit_large_patch14_clip_224" and large.model.text.config["hidden_size"] == 1024
    assert large.model.image.grad_checkpointing and large.model.text.grad_checkpointing
    assert large.micro_batch == 128 and cfg.micro_batch == 128 and cfg.model.text.config["hidden_size"] == 768
    with pytest.raises(ValueError, match="needs a name"):
        load_config(
            gpu.BenchGpuConfig, str(CONFIGS / "gpu_h200.yaml"), {"cases": [{"deepspeed": "zero3_bf16"}]}
        ).validate()
