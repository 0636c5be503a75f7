"""Shared fixtures: the real-data root, free ports, and one synthetic dataset per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Real data sets (read-only): $FGCMR_DATA, default ../shared/data beside the checkout."""
    root = Path(os.environ.get("FGCMR_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.fail(f"real data not found at {root}; set FGCMR_DATA")
    return root


@pytest.fixture
def free_port() -> int:
    """A TCP port free now (``fgcmr.distributed.free_port``)."""
    from fgcmr.distributed import free_port as port

    return port()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset (train + test splits, several shards each), sharded once per session."""
    from fgcmr.shard.job import ShardConfig, run

    out = tmp_path_factory.mktemp("synthetic") / "synth"
    cfg = ShardConfig(source="synthetic", out=str(out), items=240, seed=0)
    cfg.data.max_items_per_shard = 40
    run(cfg)
    return out
