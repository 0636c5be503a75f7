"""launchers/: each launch script starts N ranks that find each other and agree on the topology."""

from __future__ import annotations

import subprocess
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
    assert "OMP_NUM_THREADS" not in done.stderr, "the launcher sets the threads per rank (no torchrun banner)"


def test_launchers_share_the_cores_among_the_ranks():
    """The shell takes the share from ``fgcmr.launch.cores_per_rank`` (tested with 64 cores in test_distributed)."""
    from fgcmr.launch import cores_per_rank

    def threads(nproc: int, preset: str = "") -> str:
        script = f". launchers/common.sh; {preset} parse_args -n {nproc} x.py; echo $OMP_NUM_THREADS"
        env = {k: v for k, v in _clean_env().items() if k != "OMP_NUM_THREADS"}
        env["PYTHON"] = sys.executable
        return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True).stdout.strip()

    assert threads(1) == str(cores_per_rank(1))
    assert threads(128) == "1"
    assert threads(2, "export OMP_NUM_THREADS=3;") == "3"
