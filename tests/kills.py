"""Kill a job at a named moment of a write: the harness of the SIGKILL tests of export, eval, embed and the
ablation's cache (issue 11). ``paused_env`` makes every Python process of the job stop just before it renames
a file onto a path matching a glob (``tests/pause_at/sitecustomize.py``); ``kill_when_paused`` waits for that
(following the job's progress), then SIGKILLs the job's process group and every descendant (torchrun starts
each rank in a session of its own), as a node failure or ``scancel -s KILL`` would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterable

import psutil

from waits import HANG_GUARD, wait_until

HOOK = Path(__file__).resolve().parent / "pause_at"


def paused_env(pattern: str, marker: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the pause hook armed for rename targets matching ``pattern``."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK), env.get("PYTHONPATH")) if p)
    env.update(FGCMR_TEST_PAUSE_AT=pattern, FGCMR_TEST_PAUSE_MARKER=str(marker))
    marker.unlink(missing_ok=True)
    return env


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """``cmd`` in a process group of its own, output to ``log``."""
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def torchrun_and_ranks(pid: int) -> tuple[psutil.Process | None, list[psutil.Process]]:
    """The torchrun process at or below ``pid`` (``torchrun`` or ``python -m torch.distributed.run``) and the
    ranks it has started so far (not their data workers); ``(None, [])`` before it starts or once it is gone."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for p in family:
            if any(arg.endswith("torchrun") or arg == "torch.distributed.run" for arg in p.cmdline()[:3]):
                return p, p.children()
    except psutil.NoSuchProcess:  # a short-lived process (a subshell) ended while looked at
        pass
    return None, []


def running(p: psutil.Process) -> bool:
    """Still running: neither gone nor a zombie waiting for its parent to reap it."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_when_paused(proc: subprocess.Popen, marker: Path, watch: Iterable[Path]) -> dict:
    """Wait (following ``watch``) until a process of the job is paused at the hook, then SIGKILL them all;
    returns the marker (``pid``, ``target``: the path it was about to write)."""
    wait_until(marker.is_file, [proc], watch)
    paused = json.loads(marker.read_text())
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=HANG_GUARD)
    assert not alive, alive
    proc.wait()
    return paused
