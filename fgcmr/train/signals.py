"""Graceful stop on SIGTERM / SIGUSR1 (what Slurm sends before a time limit or on preemption).

The handler only sets a flag; the loop checks it after each optimizer step on every rank (one
all-reduce, so all ranks stop at the same step even if only some got the signal), saves a
checkpoint and exits with ``EXIT_REQUEUE`` = 75 (``EX_TEMPFAIL``: "try again"). A job script
requeues on it, e.g. ``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``, and the rerun continues
with ``--resume=auto``. DataLoader workers ignore both signals; their parent shuts them down.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("fgcmr.train")
EXIT_REQUEUE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device):
        self.received: int | None = None
        self.device = device
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank received a stop signal."""
        flag = torch.tensor([0 if self.received is None else 1], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a worker killed by the job's SIGTERM would crash the loop before it saves."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
