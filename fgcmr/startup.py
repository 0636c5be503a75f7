"""Where a job's start-up time goes: named marks since the process (and its launcher) started.

``mark(name)`` records the time a phase ended; ``summary()`` is one log line with every phase's
duration, measured from the process's own creation (so the interpreter's and the imports' time count),
and the launcher's share when the parent is one (its own start and the rank spawn).
``fgcmr train`` logs it at its first step; ``fgcmr bench startup`` prints it for a 2-rank launch.
"""

from __future__ import annotations

import os
import time

import psutil

_marks: list[tuple[str, float]] = []


def process_start() -> float:
    """Wall-clock time this process was created (``time.time()`` scale)."""
    return psutil.Process().create_time()


LAUNCHERS = ("torchrun", "torch.distributed.run", "fgcmr.launch")


def launcher_start() -> float | None:
    """Creation time of the launcher (torchrun's agent, ``fgcmr.launch``) that spawned this rank, if any."""
    try:
        parent = psutil.Process(os.getppid())
        cmdline = " ".join(parent.cmdline())
    except (psutil.Error, OSError):
        return None
    return parent.create_time() if any(name in cmdline for name in LAUNCHERS) else None


def mark(name: str) -> None:
    """The phase ``name`` ended now (the first mark's phase began at the process's creation)."""
    _marks.append((name, time.time()))


def phases() -> list[tuple[str, float]]:
    """(phase, seconds) in order: the launcher's share first when there is one, then each marked phase."""
    out: list[tuple[str, float]] = []
    begin = process_start()
    launched = launcher_start()
    if launched is not None:
        out.append(("launcher", begin - launched))
    for name, t in _marks:
        out.append((name, t - begin))
        begin = t
    return out


def total() -> float:
    """Seconds from the launcher's (or this process's) start to the last mark."""
    start = launcher_start() or process_start()
    return (_marks[-1][1] if _marks else time.time()) - start


def summary() -> str:
    return ", ".join(f"{name} {s:.1f}" for name, s in phases())
