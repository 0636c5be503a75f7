"""`fgcmr bench train` and `fgcmr bench data` run and print one JSON object with the figures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from waits import run_following

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    res = run_following([sys.executable, "-m", "fgcmr", "bench", *args, "--json"], cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, res.stdout
    return json.loads(lines[0])


def test_bench_train_reports_both_throughputs_and_ratio():
    r = _bench("train", "--nproc=2", "--steps=2", "--rounds=1", "--warmup=1", "--micro_batch=8")
    assert r["processes"] == 2 and r["fgcmr_samples_per_s"] > 0 and r["bare_samples_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["round_ratios"][0])
    assert "CPUs" in r["machine"]


def test_bench_data_reports_pipeline_vs_ceiling(synthetic_dataset):
    r = _bench("data", f"--shards={synthetic_dataset}", "--batches=4", "--micro_batch=8", "--workers=1")
    assert r["pipeline_samples_per_s"] > 0 and r["decode_ceiling_samples_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["pipeline_samples_per_s"] / r["decode_ceiling_samples_per_s"])
