"""A real 2-node Slurm cluster on this machine for the tests that submit jobs (session fixture ``slurm``).

Uses the cluster ``.ci/run`` started (or the one ``$SLURM_CONF`` names), or starts one with
``.ci/slurm-up.sh`` (installing Debian's slurm-wlm if needed) and stops it at the end of the session.
Skipped, loudly, only when slurm-wlm cannot be installed (not root, no package source); any other
start failure fails the tests. Tests that need two nodes ask ``two_nodes()``.
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
            warnings.warn(msg, stacklevel=2)
            pytest.skip(msg)
        if up.returncode != 0:
            pytest.fail(f".ci/slurm-up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        started = True
    yield
    if started:
        subprocess.run(["bash", str(REPO / ".ci/slurm-down.sh")], timeout=60)


def nodes() -> list[str]:
    """The cluster's node names (``sinfo -N``)."""
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return sorted(set(out.split()))


def two_nodes() -> list[str]:
    """The first two nodes; fails with what to do when the running cluster has only one (an older slurm-up.sh)."""
    names = nodes()
    if len(names) < 2:
        pytest.fail(
            f"the running Slurm cluster has {len(names)} node(s) ({', '.join(names)}); the multi-node tests need 2: "
            "restart it with `bash .ci/slurm-down.sh && bash .ci/slurm-up.sh` (or point $SLURM_CONF at a 2-node one)"
        )
    return names[:2]


def nodes_completing() -> bool:
    """Any node still cleaning up a job (state ``comp``)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout
    return any(state.startswith("comp") for state in out.split())


def job_field(job_id: str, field: str) -> str:
    """One field of ``scontrol show job`` (first record; array tasks share most fields)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, check=True
    ).stdout
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
