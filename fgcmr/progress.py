"""Progress for long jobs: tqdm on a terminal, a periodic log line otherwise (Slurm logs, CI)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("fgcmr")


def setup_logging(rank: int = 0) -> None:
    """One format for every stage; ranks other than 0 log warnings only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


class Progress:
    """Count work units; show a bar on a TTY, else log ``desc: n/total (rate/s, eta)`` every ``every_s``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every_s: float = 10.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        self.enabled = enabled

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.n / elapsed
        text = (
            f"{self.desc}: {self.n}"
            + (f"/{self.total}" if self.total else "")
            + f" {self.unit} ({rate:.1f} {self.unit}/s"
        )
        if self.total and rate > 0:
            text += f", eta {(self.total - self.n) / rate:.0f}s"
        return text + ")"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            log.info(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it") -> Iterator[T]:
    with Progress(total, desc, unit) as p:
        for item in items:
            yield item
            p.update()
