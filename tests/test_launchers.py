"""launchers/: each launch script starts N ranks that find each other and agree on the topology."""

from __future__ import annotations

import sys

import pytest

from test_distributed import WORKER, _check_two_ranks, _clean_env
from slurm_cluster import REPO
from waits import run_following


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_all_reduce_under_launcher(tmp_path, launcher):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _clean_env() | {"PYTHON": sys.executable}
    done = run_following(
        [str(REPO / f"launchers/{launcher}.sh"), "-n", "2", str(script), str(tmp_path)], env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_two_ranks(tmp_path, launcher)
