"""Progress for long jobs: tqdm on a terminal, a periodic log line otherwise (Slurm logs, CI)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("fgcmr")

# Lines libraries print on every CPU start that say nothing about the run (the loggers, and DeepSpeed's print).
NOISE = re.compile(r"Setting accelerator to CPU|No CUDA runtime is found|DeepSpeed .* built successfully")
NOISY_LOGGERS = ("DeepSpeed", "torch.utils.cpp_extension")
QUIET_LOGGERS = ("compilers",)  # setuptools' compiler: the gcc lines of DeepSpeed's op probes, at INFO
_log_file: LogFile | None = None  # set by ``log_file``: this process's log also goes there
_rank = 0  # the rank setup_logging last set up


def setup_logging(rank: int = 0) -> None:
    """One format for every stage; ranks other than 0 log warnings only (to their own file, if any)."""
    global _rank
    _rank = rank
    fmt = f"%(asctime)s [rank{rank}] %(name)s: %(message)s"
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    # Library progress bars (transformers' "Writing model shards" on save) are frames in a log; ours is Progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOISY_LOGGERS:  # a logger's filters survive the library's setup (DeepSpeed resets level, handlers)
        logger = logging.getLogger(name)
        if _drop_noise not in logger.filters:
            logger.addFilter(_drop_noise)
    if _log_file is not None:
        _log_file.path = _log_file.base if rank == 0 else _log_file.base.with_suffix(f".rank{rank}.log")
        _log_file.setFormatter(logging.Formatter(fmt, "%Y-%m-%d %H:%M:%S"))
        logging.getLogger().addHandler(_log_file)


def _drop_noise(record: logging.LogRecord) -> bool:
    return not NOISE.search(record.getMessage())


class LogFile(logging.Handler):
    """Appends to ``<output>/logs/<name>.log`` once the output directory exists and holds the records until
    then, so a run refused before any work leaves no directory behind. Ranks > 0 write ``<name>.rank<r>.log``,
    and only when they have something to say."""

    def __init__(self, base: Path):
        super().__init__()
        self.base = self.path = base
        self.pending: list[logging.LogRecord] = []
        self.stream: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None and self.stream.name != str(self.path):
            self.stream.close()  # the rank became known: its own file from now on
            self.stream = None
        if self.stream is None:
            if not self.path.parent.parent.is_dir():
                self.pending.append(record)
                return
            self.path.parent.mkdir(exist_ok=True)
            self.stream = open(self.path, "a", encoding="utf-8")
        for r in [*self.pending, record]:
            self.stream.write(self.format(r) + "\n")
        self.pending = []
        self.stream.flush()

    def close(self) -> None:  # also called by setup_logging's basicConfig(force=True): records pending stay
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()


@contextlib.contextmanager
def log_file(path: Path, header: str, rank: int = 0) -> Iterator[Path]:
    """Also write this process's log to ``path`` (appended: a resumed run keeps its history), from ``header``
    on; an error that ends the run goes there with its traceback."""
    global _log_file
    _log_file = LogFile(path)
    setup_logging(rank)
    log.info(header)
    try:
        yield path
    except Exception:
        _to_file_only(logging.ERROR, "the run failed:", sys.exc_info())
        raise
    except SystemExit as e:
        if e.code not in (0, None):
            _to_file_only(logging.WARNING, f"the run exited {e.code}", None)
        raise
    finally:
        logging.getLogger().removeHandler(_log_file)
        _log_file.close()
        _log_file = None


def _to_file_only(level: int, message: str, exc_info: Any) -> None:
    if _log_file is not None:
        _log_file.handle(log.makeRecord(log.name, level, __file__, 0, message, (), exc_info))


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """Drop the ``NOISE`` lines a library prints to stdout inside the block; pass every other line on."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if not NOISE.search(line)]
        sys.stdout.write("".join(kept))


def figure(x: float | None) -> str:
    """A metric as a person reads it in a log line (``0.5324``, not ``0.5323640163676424``); ``none`` for None."""
    return "none" if x is None else f"{x:.4f}"


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
