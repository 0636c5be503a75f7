"""Graceful stop on SIGTERM / SIGUSR1 (what Slurm sends before a time limit or on preemption) and SIGINT (Ctrl-C).

The handler only sets a flag; the loop checks it after each optimizer step on every rank (one
all-reduce, so all ranks stop at the same step even if only some got the signal), saves a
checkpoint and exits with ``EXIT_REQUEUE`` = 75 (``EX_TEMPFAIL``: "try again"). A job script
requeues on it, e.g. ``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``, and the rerun continues
with ``--resume=auto``. torchrun turns a rank's 75 into its own 1, so a rank that stops this way
also records it in ``$FGCMR_REQUEUE_FILE`` (``fgcmr.run.record_requeue``), which ``launchers/`` and
``fgcmr pipeline`` read. A rank whose launcher dies (``kill -9`` of torchrun) notices that its parent
changed and stops the same way instead of running on unsupervised. DataLoader workers ignore the
signals; their parent kills them when it exits, whichever way (``kill_workers_at_exit``, the one mechanism:
multiprocessing's exit hook would SIGTERM them, which they ignore, then wait for them forever: a rank
that failed would never end).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import signal
import threading

import torch
import torch.distributed as dist

from fgcmr.run import EXIT_REQUEUE

__all__ = ["EXIT_REQUEUE", "SIGNALS", "StopRequest", "ignore_stop_signals"]
log = logging.getLogger("fgcmr.train")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PARENT_POLL_S = 1.0


class StopRequest:
    def __init__(self, device: torch.device):
        self.received: int | None = None
        self.device = device
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        self._done = threading.Event()
        watch = threading.Thread(target=self._watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True)
        watch.start()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def _watch_parent(self, parent: int) -> None:
        """Orphaned (the launcher was killed): stop as if it had sent SIGTERM."""
        while not self._done.wait(PARENT_POLL_S):
            if os.getppid() != parent:
                log.warning("the launcher (pid %d) is gone: stopping", parent)
                self.received = signal.SIGTERM
                return

    def agreed(self) -> bool:
        """True on every rank as soon as any rank received a stop signal."""
        flag = torch.tensor([0 if self.received is None else 1], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        self._done.set()
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a worker killed by the job's SIGTERM would crash the loop before it saves.

    It still dies with its parent (Linux ``PR_SET_PDEATHSIG``), so a killed rank leaves no orphan reading on.
    """
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux
        pass


_kill_registered = False


def kill_workers_at_exit() -> None:
    """Register (once) an exit hook that kills this process's daemonic children: DataLoader workers, which
    ignore SIGTERM. It runs before multiprocessing's own hook (atexit is last-in, first-out), which would
    otherwise wait for them forever."""
    global _kill_registered
    if _kill_registered:
        return
    _kill_registered = True

    def kill() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join(timeout=5)

    atexit.register(kill)
