"""Waits that follow progress, not a wall-clock budget: a test waits as long as the job it watches makes
progress (its output grows, a file appears, a process ends) and calls it a hang only after ``HANG_GUARD``
seconds without any. A slow, loaded machine then never fails a test that a quiet one passes."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

HANG_GUARD = 900.0  # seconds without progress; longer than DeepSpeed's first-start op build under load


def _size(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def wait_until(
    done: Callable[[], bool],
    procs: list[subprocess.Popen],
    watch: Iterable[Path],
    stall: float = HANG_GUARD,
    early_exit_ok: bool = False,
) -> None:
    """Poll ``done()``; fail if a process exits first (unless ``early_exit_ok``) or nothing in ``watch`` grows
    and no process ends for ``stall`` seconds."""
    watch = list(watch)
    last, seen, alive = time.monotonic(), _size(watch), sum(p.poll() is None for p in procs)
    while not done():
        if not early_exit_ok and any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited early: {[p.poll() for p in procs]}")
        now_size, now_alive = _size(watch), sum(p.poll() is None for p in procs)
        if (now_size, now_alive) != (seen, alive):
            last, seen, alive = time.monotonic(), now_size, now_alive
        elif time.monotonic() - last > stall:
            for p in procs:
                p.kill()
            raise TimeoutError(f"no progress for {stall:.0f} s (a hang); watched {[str(w) for w in watch]}")
        time.sleep(0.2)


def wait_procs(procs: list[subprocess.Popen], watch: Iterable[Path], stall: float = HANG_GUARD) -> list[int]:
    """Exit codes of ``procs`` once all have ended, following progress in ``watch``."""
    wait_until(lambda: all(p.poll() is not None for p in procs), procs, watch, stall, early_exit_ok=True)
    return [p.wait() for p in procs]


def run_following(
    cmd: list[str], stall: float = HANG_GUARD, watch: Iterable[Path] = (), **kw
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kw)`` without a fixed timeout: output is
    written to files that are watched for progress (with ``watch``)."""
    with tempfile.TemporaryDirectory(prefix="fgcmr-test-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, **kw)
            wait_procs([proc], [out, err, *watch], stall)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())
