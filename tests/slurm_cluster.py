"""A real single-node Slurm cluster for the tests that submit jobs (session fixture ``slurm``).

Uses the cluster ``.ci/run`` started, or starts one with ``.ci/slurm-up.sh`` (installing Debian's
slurm-wlm if needed) and stops it at the end of the session. Skipped, loudly, only when slurm-wlm
cannot be installed (not root, no package source); any other start failure fails the tests.
"""
from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0


@pytest.fixture(scope="session")
def slurm():
    """Yields once a Slurm node is idle; ``sbatch``/``srun`` then work from the test process."""
    started = False
    if not _answers():
        up = subprocess.run(["bash", str(REPO / ".ci/slurm-up.sh")], capture_output=True, text=True, timeout=600)
        if up.returncode == 3:
            msg = f"SLURM TESTS SKIPPED: slurm-wlm could not be installed here: {up.stderr.strip()}"
            warnings.warn(msg)
            pytest.skip(msg)
        if up.returncode != 0:
            pytest.fail(f".ci/slurm-up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(REPO / ".ci/slurm-down.sh")], timeout=60)


def job_field(job_id: str, field: str) -> str:
    """One field of ``scontrol show job`` (first record; array tasks share most fields)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, check=True).stdout
    for token in out.split():
        key, _, value = token.partition("=")
        if key == field:
            return value
    raise KeyError(f"{field} not in scontrol output for job {job_id}")


def wait_state(job_id: str, states: set[str], timeout: float) -> str:
    """Poll until the job is in one of ``states``; fail the test with the job's record on timeout."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = job_field(job_id, "JobState")
        if state in states:
            return state
        time.sleep(0.5)
    record = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    pytest.fail(f"job {job_id} still {state} after {timeout:.0f} s, wanted {sorted(states)}:\n{record}")


@pytest.fixture
def cancel_after():
    """Register job ids; any still queued or running when the test ends (e.g. it failed) is cancelled."""
    jobs: list[str] = []
    yield jobs.append
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
