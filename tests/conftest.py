"""Shared fixtures (the real-data root, free ports, one synthetic dataset per session) and the test groups."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n 2 --dist loadgroup --no-loadscope-reorder`` (``make test``): one per test file,
    so a file's module fixtures are made once, and one for every Slurm test, so they never compete for the
    cluster's two nodes. Groups with more slow tests run first, so that no long one starts last."""
    groups = {}
    for item in items:
        uses_cluster = "slurm" in item.fixturenames or item.get_closest_marker("slurm")
        groups[item] = "slurm" if uses_cluster else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    slow = collections.Counter(groups[item] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[groups[item]])  # stable: files keep their order within a weight


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
    from fgcmr.launch import free_port as port

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
