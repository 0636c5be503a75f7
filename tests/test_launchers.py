"""launchers/: the deepspeed launcher script starts N ranks that find each other (torchrun: test_distributed)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from test_distributed import WORKER, _check_two_ranks, _clean_env
from slurm_cluster import REPO


@pytest.mark.slow
def test_all_reduce_under_deepspeed_launcher(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _clean_env() | {"PYTHON": sys.executable}
    subprocess.run([str(REPO / "launchers/deepspeed.sh"), "-n", "2", str(script), str(tmp_path)],
                   env=env, cwd=REPO, check=True, timeout=240)
    _check_two_ranks(tmp_path, "deepspeed")


def test_launchers_print_usage_without_a_command():
    for name in ("torchrun.sh", "deepspeed.sh"):
        r = subprocess.run([str(REPO / "launchers" / name)], capture_output=True, text=True, env=_clean_env())
        assert r.returncode == 2 and "NPROC" in r.stderr, r.stderr
