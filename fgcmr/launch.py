"""Starting ranks on this host: free rendezvous ports, thread shares, and the launch commands.

``python -m fgcmr.launch --nproc=N <python args>`` is fgcmr's launcher for one node (what ``fgcmr pipeline``
uses): it starts ``N`` ranks with torchrun's variables and one rendezvous on a free port, and supervises them
as torchrun does (signals go on to every rank; when one fails the others get SIGTERM, then SIGKILL after
``GRACE_S``; a rank whose launcher is killed gets SIGTERM), but it imports no torch: torchrun's agent spends
its first ~3 s of a 2-core machine importing torch before it starts a rank. It exits with the first failing
rank's code (torchrun says 1 whatever the rank said), or ``EXIT_REQUEUE`` when every rank that stopped asked
for a requeue. Several nodes: torchrun (``launchers/torchrun.sh``) or srun. Nothing here imports torch, so a
driver such as ``fgcmr pipeline`` stays light.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from fgcmr.run import EXIT_REQUEUE

GRACE_S = 30.0  # how long the other ranks get to end after one failed, before SIGKILL (torchrun's too)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ``bind(0)`` and outgoing connections (Linux's default where it cannot be read)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def free_port() -> int:
    """A TCP port free on this host now, for a local rendezvous: drawn above the ephemeral range (``slurm_port``
    keeps below it), since a port from ``bind(0)`` is free only until the kernel hands it on, and concurrent
    jobs' gloo connections take ephemeral ports by the hundred."""
    low, high = ephemeral_ports()
    first, last = (high + 1, 65535) if 65535 - high >= 1000 else (1024, low - 1)
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randint(first, last)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {first}-{last} after 200 tries")


def rank_variables(
    rank: int, world_size: int, local_rank: int, local_world_size: int, master_addr: str, master_port: int
) -> dict[str, str]:
    """torchrun's variables for one rank, which DeepSpeed and torch read (and ``fgcmr.distributed`` reads back)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def local_rank_envs(nproc: int, port: int | None = None) -> list[dict[str, str]]:
    """torchrun's variables for ``nproc`` ranks of this host, one rendezvous (on a free port unless ``port``)."""
    port = port or free_port()
    return [rank_variables(r, nproc, r, nproc, "127.0.0.1", port) for r in range(nproc)]


def cores_per_rank(local_ranks: int) -> int:
    """This process's usable cores shared among ``local_ranks`` ranks on this node (never oversubscribe)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_ranks))


def launch_env(nproc: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start ``nproc`` local ranks in: ``OMP_NUM_THREADS`` is the cores per rank unless the
    caller set it, since torchrun would set 1 (and print a banner about it), which a rank cannot tell from a
    user's 1: a 2-rank run on a 64-core node would compute on 2 cores."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", str(cores_per_rank(nproc)))
    return env


def local_command(nproc: int, args: Sequence[str]) -> list[str]:
    """``python <args>`` on ``nproc`` ranks of this host under fgcmr's launcher; run it in ``launch_env``."""
    return [sys.executable, "-m", "fgcmr.launch", f"--nproc={nproc}", *args]


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """torchrun running ``python <args>`` on ``nproc`` ranks of this host, rendezvous on a free local port
    (``launchers/torchrun.sh`` is the same for people, and for several nodes); run it in ``launch_env``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [
        *launcher,
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]


def job_code(codes: Sequence[int], first_failure: int | None) -> int:
    """The launch's exit code from its ranks' (a signal's death as the shell says it, 128 + n)."""
    if first_failure is None:
        return 0
    failed = [c for c in codes if c != 0]
    if all(c == EXIT_REQUEUE for c in failed):
        return EXIT_REQUEUE
    return first_failure if first_failure > 0 else 128 - first_failure


def supervise(procs: list[subprocess.Popen], grace_s: float = GRACE_S) -> int:
    """Wait for every rank; signals to this process go on to them; the first failure stops the others."""

    def live() -> list[subprocess.Popen]:
        return [p for p in procs if p.poll() is None]

    def forward(signum, frame) -> None:
        for p in live():
            p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    first_failure, deadline = None, None
    try:
        while live():
            for p in procs:
                code = p.poll()
                if code not in (None, 0) and first_failure is None:
                    first_failure = code
                    if code != EXIT_REQUEUE:  # the others are stuck in a collective with it, or soon will be
                        forward(signal.SIGTERM, None)
                        deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                for p in live():
                    p.kill()
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.wait() for p in procs]
    if first_failure is None:
        first_failure = next((c for c in codes if c != 0), None)
    return job_code(codes, first_failure)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    nproc = argv[0].removeprefix("--nproc=") if argv and argv[0].startswith("--nproc=") else ""
    if not nproc.isdigit() or int(nproc) < 1 or len(argv) < 2:
        print("usage: python -m fgcmr.launch --nproc=N <python args>  (e.g. -m fgcmr.cli train ...)", file=sys.stderr)
        return 2
    nproc, args = int(nproc), argv[1:]
    envs = local_rank_envs(nproc)
    return supervise([start_rank([sys.executable, *args], {**os.environ, **env}) for env in envs])


def start_rank(cmd: Sequence[str], env: Mapping[str, str], **popen: Any) -> subprocess.Popen:
    """One rank, SIGTERMed if its launcher dies (``kill -9``), so that no rank runs on unsupervised."""
    return subprocess.Popen(cmd, env=env, preexec_fn=_sigterm_when_orphaned, **popen)


def _sigterm_when_orphaned() -> None:
    """In a rank, before it runs: SIGTERM it when its parent dies; a training rank then checkpoints and
    exits 75, as on any SIGTERM."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux
        pass


if __name__ == "__main__":
    sys.exit(main())
