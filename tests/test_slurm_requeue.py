"""A preempted training job on a real Slurm cluster: USR1 → checkpoint → requeue → resume → same step count.

``scancel --signal=USR1 --batch`` signals the job script, as Slurm's ``--signal=B:USR1@<s>`` does
before the time limit; the script forwards it to the ranks, which checkpoint and exit 75, and the
script requeues the job. Slurm holds a requeued job for two minutes (its BeginTime); the test
releases it at once with ``scontrol update StartTime=now``, as an operator might.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from fgcmr.slurm import submit_pipeline

from slurm_cluster import cancel_after, job_field, slurm, wait_state  # noqa: F401  (fixtures)

STEPS = 60
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def wait_for_log(job_id: str, log: Path, pattern: str, timeout: float) -> re.Match:
    """Poll the job's log for ``pattern``; fail at once if the job ended without printing it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = job_field(job_id, "JobState") in ENDED
        m = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
        if m:
            return m
        if ended:
            break
        time.sleep(0.3)
    pytest.fail(f"{pattern!r} not in {log} ({job_field(job_id, 'JobState')}):\n{log.read_text() if log.exists() else '(no log)'}")


@pytest.mark.slow
@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_step_count(tmp_path, synthetic_dataset, slurm, cancel_after):  # noqa: F811
    # The pipeline layout: <data_dir>/shards (the session's synthetic data, so shard is already done), <out>/run.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").symlink_to(synthetic_dataset)
    out, run = tmp_path / "out", tmp_path / "out" / "run"
    train = {"model": "tiny", "loss": {"name": "clip"}, "max_steps": STEPS, "checkpoint_every": 1000, "log_every": 1,
             "data": {"micro_batch": 8, "workers": 1, "augment": False}}
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "requeue", "data_dir": str(tmp_path / "data"), "train": train,
                                   "slurm": {"tasks_per_node": 2, "cpus_per_task": 1, "time": "00:10:00"}}))
    jobs = {j["name"]: j for j in submit_pipeline(str(exp), out=str(out))}
    assert list(jobs) == ["train", "eval"], "shard is done; train, then export + eval"
    subprocess.run(["scancel", jobs["eval"]["job_id"]], check=True)  # not what this test is about
    job_id, log = jobs["train"]["job_id"], Path(jobs["train"]["log"])
    cancel_after(job_id)

    wait_for_log(job_id, log, rf"step 5/{STEPS}", timeout=120)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    stopped_at = int(wait_for_log(job_id, log, r"stop signal received: checkpointing at step (\d+)", timeout=60).group(1))
    assert 5 <= stopped_at < STEPS
    wait_for_log(job_id, log, rf"requeueing job {job_id}", timeout=30)
    deadline = time.monotonic() + 30
    while job_field(job_id, "Restarts") != "1" or job_field(job_id, "JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {job_field(job_id, 'JobState')}"
        time.sleep(0.3)
    # Release it only once the first run is cleaned up: slurmd rejects a credential issued in the same
    # second the old one was revoked ("Job credential revoked"), and the restart would fail.
    while subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip().startswith("comp"):
        time.sleep(0.3)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    wait_state(job_id, {"COMPLETED"}, timeout=180)

    text = log.read_text()
    assert "restart 1" in text
    assert f"from step {stopped_at}" in text, "the requeued run must resume from the signal's checkpoint"
    assert (run / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    logged = [int(n) for n in re.findall(rf"step (\d+)/{STEPS} loss", text)]
    assert logged == list(range(1, STEPS + 1)), "every step runs exactly once across the two runs"
    metrics = json.loads((run / "train_metrics.json").read_text())
    # Same step and sample count as an uninterrupted run: STEPS steps of 2 ranks × 8 samples.
    assert (metrics["step"], metrics["samples_seen"], metrics["world_size"]) == (STEPS, STEPS * 16, 2)
    assert job_field(job_id, "ExitCode") == "0:0"
