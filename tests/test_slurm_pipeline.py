"""The whole chain on a real 2-node Slurm cluster, preempted on the way.

``fgcmr submit pipeline configs/experiments/synthetic-tiny.yaml --slurm.nodes=2
--slurm.tasks_per_node=1``: shard (array of 2) → merge → label → infer → train → eval (export +
eval), every multi-rank job with one rank on each of the nodes n1 and n2 (2 ranks, as on one node
before: the same cost). While training runs, ``scancel --signal=USR1 --batch`` signals its job
script, as Slurm's ``--signal=B:USR1@<s>`` does before a time limit: the script forwards it to the
ranks of both nodes, they checkpoint and exit 75, the script requeues the 2-node job, the rerun
resumes from the checkpoint and runs every step exactly once, and the chain goes on. Every job ends
COMPLETED; outputs are verified.

Slurm holds a requeued job for two minutes (its BeginTime); the test releases it at once with
``scontrol update StartTime=now``, as an operator might.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fgcmr.slurm import chain_status, submit_pipeline

from slurm_cluster import REPO, cancel_after, job_field, nodes_completing, slurm, two_nodes, wait_state  # noqa: F401  (fixtures)

STEPS = 40  # long enough (a few seconds) to be signalled mid-run
HANG = 1200  # hang guard of one wait (a loaded 2-core machine runs the chain several times slower than a quiet one)
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
    pytest.fail(
        f"{pattern!r} not in {log} ({job_field(job_id, 'JobState')}):\n"
        f"{log.read_text() if log.exists() else '(no log)'}"
    )


def preempt_and_release(job_id: str, log: Path) -> int:
    """USR1 to the job script; wait for checkpoint + requeue; release the requeued job. Returns the step."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    stopped_at = int(
        wait_for_log(job_id, log, r"stop signal received: checkpointing at step (\d+)", timeout=600).group(1)
    )
    wait_for_log(job_id, log, rf"requeueing job {job_id}", timeout=600)
    deadline = time.monotonic() + 30
    while job_field(job_id, "Restarts") != "1" or job_field(job_id, "JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {job_field(job_id, 'JobState')}"
        time.sleep(0.3)
    # Release it only once the first run is cleaned up: slurmd rejects a credential issued in the same
    # second the old one was revoked ("Job credential revoked"), and the restart would fail.
    while nodes_completing():
        time.sleep(0.3)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    return stopped_at


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_pipeline_runs_every_job_to_completion_through_a_preemption(tmp_path, capsys, slurm, cancel_after):  # noqa: F811
    n1, n2 = two_nodes()
    out = tmp_path / "exp"
    scratch = Path(tempfile.mkdtemp(prefix="fgcmr-scratch-"))  # short: Unix sockets live under TMPDIR
    t0 = time.monotonic()
    jobs = {
        j["name"]: j
        for j in submit_pipeline(
            str(REPO / "configs/experiments/synthetic-tiny.yaml"),
            out=str(out),
            overrides={
                "train.max_steps": STEPS,
                "train.log_every": 1,
                "train.checkpoint_every": 1000,
                "slurm.nodes": 2,
                "slurm.tasks_per_node": 1,
                "slurm.scratch": str(scratch),
            },
        )
    }
    for j in jobs.values():
        cancel_after(j["job_id"])
    assert list(jobs) == ["shard", "merge", "label", "infer", "train", "eval"]

    train_id, train_log = jobs["train"]["job_id"], Path(jobs["train"]["log"])
    wait_for_log(train_id, train_log, rf"step 3/{STEPS} loss", timeout=HANG)
    stopped_at = preempt_and_release(train_id, train_log)
    assert 3 <= stopped_at < STEPS
    wait_state(jobs["eval"]["job_id"], ENDED, timeout=HANG)
    wall = time.monotonic() - t0

    capsys.readouterr()
    states = chain_status(str(out))
    report = capsys.readouterr().out
    print(f"\nSlurm pipeline wall time {wall:.0f} s\n{report}", file=sys.stderr)
    assert [(t.job, t.state) for t in states] == [("shard", "COMPLETED")] * 2 + [
        (name, "COMPLETED") for name in ("merge", "label", "infer", "train", "eval")
    ], report
    assert all(t.exit_code == "0:0" for t in states)

    # Shard: both array tasks wrote chunks; the merge job's manifest counts every item.
    data = out / "data" / "shards"
    manifest = json.loads((data / "manifest.json").read_text())
    assert (manifest["items_in"], manifest["items_written"]) == (200, 200)
    shard_files = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    assert len(shard_files) == 10 and all((data / f).is_file() for f in shard_files)
    for task in (0, 1):
        assert Path(jobs["shard"]["log"].replace("%a", str(task))).is_file()
    # Label + infer: a labeler and one sidecar per data shard.
    assert (out / "data" / "labeler" / "metrics.json").is_file()
    sidecars = data / "labels" / "labeler"
    assert sorted(p.stem for p in sidecars.glob("*-*.npz")) == sorted(Path(f).name.split(".")[0] for f in shard_files)
    # Every multi-rank job ran one rank on each node.
    for name in ("label", "infer", "train", "eval"):
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", job_field(jobs[name]["job_id"], "NodeList")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert hosts == [n1, n2], name
        assert "world=2 local_world=1" in Path(jobs[name]["log"]).read_text(), name
    assert not list(
        scratch.glob("fgcmr-rank*")
    )  # slurm.scratch: the ranks' temp dirs were made there and removed at exit
    shutil.rmtree(scratch)
    # Train: preempted once, resumed, every step exactly once.
    text = train_log.read_text()
    assert "restart 1" in text and f"from step {stopped_at}" in text
    assert [int(n) for n in re.findall(rf"step (\d+)/{STEPS} loss", text)] == list(range(1, STEPS + 1))
    summary = json.loads((out / "run" / "train_metrics.json").read_text())
    assert (summary["step"], summary["samples_seen"], summary["world_size"]) == (STEPS, STEPS * 2 * 16, 2)
    # Export + eval: metrics of the exported model, on 2 ranks.
    metrics = json.loads((out / "run" / "eval" / "metrics.json").read_text())
    assert json.loads((out / "run" / "eval" / "run_info.json").read_text())["export"] == str(out / "run" / "export")
    assert 0 <= metrics["map_avg"] <= 1 and metrics["images"] == 40
    assert (out / "run" / "eval" / "report.png").is_file()
