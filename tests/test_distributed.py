"""fgcmr.distributed: one resolution of rank/world/rendezvous per launcher, and real gloo groups.

Unit tests feed each launcher's real variables to ``resolve_env``; the integration tests run a
2-process all_reduce under ``srun -n2`` (under the launch scripts: test_launchers.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fgcmr.config import ConfigError
from fgcmr.distributed import (
    DistEnv,
    first_slurm_host,
    resolve_env,
    slurm_port,
    tasks_on_node,
    thread_count,
    use_scratch,
)
from fgcmr.launch import ephemeral_ports, free_port, launch_env

from slurm_cluster import REPO, slurm, two_nodes  # noqa: F401  (session fixture)
from waits import run_following

# What `srun -N2 -n3` (2 tasks on node a01, 1 on a02) gives its third task, as Slurm 22.05 sets it.
SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "1",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "3",
    "SLURM_STEP_NUM_TASKS": "3",
    "SLURM_JOB_NODELIST": "a[01-02]",
    "SLURM_STEP_NODELIST": "a[01-02]",
    "SLURM_TASKS_PER_NODE": "2,1",
    "SLURM_STEP_TASKS_PER_NODE": "2,1",
    "SLURM_CPUS_PER_TASK": "6",
}


def test_single_process_defaults():
    d = resolve_env({})
    assert (d.rank, d.world_size, d.local_rank, d.launcher, d.distributed) == (0, 1, 0, "single", False)
    assert d.master_port == 29500
    # the free port init_distributed picks for a lone process survives (29500 may be another job's)
    assert resolve_env({"MASTER_PORT": "41234"}).master_port == 41234


def test_torchrun_variables():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "1234",
        "TORCHELASTIC_RUN_ID": "x",
        "GROUP_RANK": "0",
    }
    assert resolve_env(env) == DistEnv(3, 8, 1, 4, "n0", 1234, "torchrun")


def test_deepspeed_launcher_variables():
    # deepspeed.launcher.launch sets LOCAL_SIZE / CROSS_RANK instead of torchrun's LOCAL_WORLD_SIZE.
    env = {
        "RANK": "5",
        "WORLD_SIZE": "6",
        "LOCAL_RANK": "2",
        "LOCAL_SIZE": "3",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29501",
    }
    assert resolve_env(env) == DistEnv(5, 6, 2, 3, "10.0.0.1", 29501, "deepspeed")


def test_torchrun_inside_slurm_wins_over_slurm():
    env = dict(
        SRUN_TASK, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="x", MASTER_PORT="9"
    )
    d = resolve_env(env)
    assert (d.launcher, d.world_size, d.master_port, d.cpus) == ("torchrun", 2, 9, 6)


def test_srun_task_variables(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed in Python
    d = resolve_env(SRUN_TASK)
    assert d == DistEnv(2, 3, 0, 1, "a01", slurm_port(4242, 1), "slurm", cpus=6)
    assert thread_count(d, {}) == 6


def test_batch_shell_is_a_single_process():
    # sbatch's own shell carries SLURM_PROCID=0 and SLURM_NTASKS=N but no step: joining N ranks would hang.
    env = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}
    d = resolve_env(env)
    assert (d.world_size, d.launcher) == (1, "single")


def test_tasks_per_node_and_hostnames(monkeypatch):
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(ValueError, match="tasks per node"):
        tasks_on_node("two", 0)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_slurm_host("gpu[007-009,012],cpu1") == "gpu007"
    assert first_slurm_host("gpu[3,5]") == "gpu3"
    assert first_slurm_host("nodeA,nodeB") == "nodeA"


def test_slurm_ports_differ_per_job_and_step_and_avoid_ephemeral_range():
    ports = {slurm_port(j, s) for j in range(1000, 1100) for s in range(4)}
    assert len(ports) == 400
    assert all(10000 <= p < 32768 for p in ports)


def test_free_ports_are_outside_the_ephemeral_range_and_bindable():
    low, high = ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(not low <= p <= high and p >= 1024 for p in ports)
    if 65535 - high >= 1000:  # the usual kernel range leaves room above it: slurm_port's range stays Slurm's
        assert all(p > high for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free when drawn


def test_thread_counts():
    assert thread_count(DistEnv(cpus=5), {"OMP_NUM_THREADS": "1"}) == 5
    assert thread_count(DistEnv(local_world_size=2), {"OMP_NUM_THREADS": "3"}) == 3
    cores = len(os.sched_getaffinity(0))
    assert thread_count(DistEnv(local_world_size=2), {}) == max(1, cores // 2)
    assert thread_count(DistEnv(local_world_size=10 * cores), {}) == 1


def test_launch_env_shares_the_cores_unless_the_caller_set_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert launch_env(2, {})["OMP_NUM_THREADS"] == "32"  # torchrun would give each rank 1
    assert launch_env(128, {})["OMP_NUM_THREADS"] == "1"
    assert launch_env(2, {"OMP_NUM_THREADS": "3", "A": "b"}) == {"OMP_NUM_THREADS": "3", "A": "b"}


def test_scratch_holds_each_ranks_temporary_files(monkeypatch):
    import shutil
    import tempfile

    monkeypatch.setenv("FGCMR_SCRATCH", "")
    monkeypatch.delenv("FGCMR_SCRATCH")
    assert use_scratch(3) is None  # no --scratch: nothing changes
    for var in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # use_scratch sets them: restore after
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    local = Path(tempfile.mkdtemp(prefix="fgcmr-scratch-")) / "local"  # short: Unix sockets live under it
    monkeypatch.setenv("FGCMR_SCRATCH", str(local))
    monkeypatch.setattr(tempfile, "tempdir", None)
    path = use_scratch(3)
    try:
        assert path.parent == local and path.name.startswith("fgcmr-rank3-") and path.is_dir()
        assert Path(tempfile.gettempdir()) == path and os.environ["TMPDIR"] == str(path)
        assert os.environ["TRITON_CACHE_DIR"] == str(local / "cache" / "triton")
        assert use_scratch(3) == path  # a second init() in the process keeps it
        monkeypatch.setenv("FGCMR_SCRATCH", "/tmp/" + "x" * 80)
        with pytest.raises(ConfigError, match="too long for the Unix sockets"):
            use_scratch(3)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(local.parent)


def test_cli_scratch_option_reaches_the_environment(tmp_path, monkeypatch):
    from fgcmr import cli

    monkeypatch.setenv("FGCMR_SCRATCH", "")  # recorded, so teardown removes what cli._scratch sets
    monkeypatch.delenv("FGCMR_SCRATCH")  # (a delenv of an absent variable records nothing: it leaked into later tests)
    options = {"scratch": str(tmp_path), "out": "x"}
    cli._scratch(options)
    assert options == {"out": "x"} and os.environ["FGCMR_SCRATCH"] == str(tmp_path)


LONE = """
import os, socket, subprocess, sys
import torch.distributed as dist
from fgcmr.runtime.engine import init_distributed

d = init_distributed(1)
assert (d.world_size, dist.get_world_size()) == (1, 1)
if sys.argv[1] == "parent":
    with socket.socket() as s:  # the group holds no port: the one it published is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))
    child = subprocess.run([sys.executable, "-c", sys.argv[2], "child"], env=os.environ)  # inherits the variables
    sys.exit(child.returncode)
"""


def test_a_lone_rank_binds_no_port_so_its_children_can_join_too():
    """A stage run in-process as a lone rank (DeepSpeed's group of one) published ``MASTER_PORT``/``RANK``;
    on a TCP store it kept listening there, and a process it started next, inheriting them, failed EADDRINUSE."""
    env = {**_clean_env(), "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", LONE, "parent", LONE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


WORKER = """
import json, sys, torch, torch.distributed as dist
from fgcmr.distributed import init
d = init()
t = torch.tensor([float(d.rank + 1)])
dist.all_reduce(t)
out = {"rank": d.rank, "world": d.world_size, "local_rank": d.local_rank, "local_world": d.local_world_size,
       "launcher": d.launcher, "backend": dist.get_backend(), "sum": t.item(), "threads": torch.get_num_threads()}
open(f"{sys.argv[1]}/rank{d.rank}.json", "w").write(json.dumps(out))
dist.destroy_process_group()
"""


def _check_two_ranks(out: Path, launcher: str) -> None:
    results = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert (r["world"], r["local_world"], r["launcher"], r["backend"], r["sum"]) == (2, 2, launcher, "gloo", 3.0)
    assert [r["local_rank"] for r in results] == [0, 1]


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    return {k: v for k, v in os.environ.items() if k not in drop and (not k.startswith("SLURM_") or k == "SLURM_CONF")}


@pytest.mark.slow
@pytest.mark.slurm
def test_all_reduce_under_srun(tmp_path, slurm):  # noqa: F811
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = run_following(
        ["srun", "-N1", "-n2", "--cpus-per-task=1", sys.executable, str(script), str(tmp_path)],
        env=_clean_env(),
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_two_ranks(tmp_path, "slurm")
    assert json.loads((tmp_path / "rank0.json").read_text())["threads"] == 1


@pytest.mark.slow
@pytest.mark.slurm
def test_all_reduce_across_two_slurm_nodes(tmp_path, slurm):  # noqa: F811
    """srun -N2 -n4: two real Slurm nodes, 2 tasks each; the master is the first node by name (resolved)."""
    n1, n2 = two_nodes()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run(
        [
            "srun",
            "-N2",
            "-n4",
            f"--nodelist={n1},{n2}",
            "--cpus-per-task=1",
            sys.executable,
            str(script),
            str(tmp_path),
        ],
        env=_clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["local_world"], r["world"], r["sum"]) for r in results] == [
        (0, 0, 2, 4, 10.0),
        (1, 1, 2, 4, 10.0),
        (2, 0, 2, 4, 10.0),
        (3, 1, 2, 4, 10.0),
    ]
    assert f"master={n1}:" in done.stderr
