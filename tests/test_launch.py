"""fgcmr.launch: ranks of one node started without torchrun's agent, supervised as torchrun does.

The ranks here are tiny Python scripts (no torch), so each case costs a fraction of a second; the
pipeline tests run real stages under it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from fgcmr.launch import EXIT_REQUEUE, job_code, local_command, supervise
from waits import HANG_GUARD, wait_until

RANK = """
import json, os, signal, sys, time
out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "requeue":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({**{n: os.environ[n] for n in names}, "pid": os.getpid()}, f)
if mode == "fail" and rank == 1:
    while not os.path.exists(f"{out}/rank0.json"):
        time.sleep(0.05)
    sys.exit(3)
if mode != "ok":
    time.sleep(600)
"""


def _launch(tmp_path: Path, mode: str, nproc: int = 2) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    return subprocess.Popen(local_command(nproc, [str(script), str(tmp_path), mode]))


def _ranks(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]


def test_ranks_get_torchruns_variables_and_one_rendezvous(tmp_path):
    launcher = _launch(tmp_path, "ok")
    assert launcher.wait(timeout=HANG_GUARD) == 0
    ranks = _ranks(tmp_path)
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) for r in ranks] == [
        ("0", "0", "2", "2"),
        ("1", "1", "2", "2"),
    ]
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1


def test_a_failing_rank_ends_the_others_and_its_code_is_the_jobs(tmp_path):
    """torchrun would say 1; the rank said 3 (a usage error's 2 stays 2)."""
    launcher = _launch(tmp_path, "fail")
    assert launcher.wait(timeout=HANG_GUARD) == 3
    assert not psutil.pid_exists(_ranks(tmp_path)[0]["pid"])  # the sleeping rank 0 was stopped, and reaped


def test_a_signal_goes_on_to_every_rank_and_a_requeue_is_kept(tmp_path):
    """SIGTERM (Slurm's, or the pipeline's) reaches each rank; all exit 75, and so does the launcher."""
    launcher = _launch(tmp_path, "requeue")
    wait_until(lambda: len(_ranks(tmp_path)) == 2, [launcher], [tmp_path])
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=HANG_GUARD) == EXIT_REQUEUE


def test_ranks_of_a_killed_launcher_get_sigterm(tmp_path):
    launcher = _launch(tmp_path, "sleep")
    wait_until(lambda: len(_ranks(tmp_path)) == 2, [launcher], [tmp_path])
    launcher.kill()
    launcher.wait()
    ranks = [psutil.Process(r["pid"]) for r in _ranks(tmp_path)]
    _, alive = psutil.wait_procs(ranks, timeout=HANG_GUARD)
    assert not alive


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    stubborn = subprocess.Popen([sys.executable, str(script), str(tmp_path), "stubborn"], env=env)
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    wait_until(lambda: len(_ranks(tmp_path)) == 1, [stubborn], [tmp_path])
    assert supervise([stubborn, failing], grace_s=0.5) == 4
    assert stubborn.returncode == -signal.SIGKILL


def test_job_codes():
    assert job_code([0, 0], None) == 0
    assert job_code([75, 75], 75) == EXIT_REQUEUE
    assert job_code([75, 0], 75) == EXIT_REQUEUE
    assert job_code([1, 75], 1) == 1
    assert job_code([-9, 0], -9) == 137


def test_usage_and_no_torch_before_the_ranks():
    for wrong in (["train"], ["--nproc=0", "x.py"], ["--nproc=2"]):
        usage = subprocess.run([sys.executable, "-m", "fgcmr.launch", *wrong], capture_output=True, text=True)
        assert usage.returncode == 2 and "--nproc=N" in usage.stderr, wrong
    light = "import sys, fgcmr.launch, fgcmr.pipeline; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", light], capture_output=True, text=True).stdout.strip() == "False"
