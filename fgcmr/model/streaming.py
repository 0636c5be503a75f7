"""A safetensors file written tensor by tensor: the header from the shapes alone, then each tensor
materialised, written and dropped, so the whole model never sits in memory at once.

The tensors come from any mapping whose values have ``.shape`` and ``.contiguous()``: plain tensors, or
DeepSpeed's lazy ``GatheredTensor`` (a ZeRO-3 parameter gathered from every rank's memory-mapped
partition only when read). The file is the one ``safetensors.torch.save_file`` writes for the same
tensors (float32, data in name order, header padded to 8 bytes), with its header's keys sorted, so
identical weights give identical bytes in every process. Peak extra memory is one tensor:
``write_safetensors`` measures it (anonymous resident memory, Linux) and reports it. Each large tensor's
memory goes back to the OS once written (``malloc_trim``): glibc would otherwise keep several freed
tensors' worth in its heap (its mmap threshold grows with the tensors freed).
"""

from __future__ import annotations

import ctypes
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("fgcmr.model")

DTYPE = torch.float32  # exports are float32 whatever the training precision
ALIGN = 8  # safetensors pads its header so the data starts 8-byte aligned


def _anon_rss() -> int | None:
    """This process's anonymous resident memory (heap, not file-backed pages such as a memory-mapped
    checkpoint, which the kernel can drop), or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc; elsewhere nothing to do)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (absent outside glibc)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: ctypes.CDLL | bool | None = None
TRIM_ABOVE = 1 << 20  # bytes: smaller tensors stay in malloc's small-block arenas anyway


def header(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The padded JSON header (keys sorted) and the tensor names in data order."""
    names = sorted(tensors)
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        shape = [int(d) for d in tensors[name].shape]
        size = int(np.prod(shape, dtype=np.int64)) * DTYPE.itemsize
        entries[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % ALIGN), names


def write_safetensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, Any]:
    """Write ``tensors`` (as float32) to ``path`` one at a time. Returns what it wrote: ``tensors``,
    ``bytes``, ``largest`` (bytes of the largest tensor) and ``peak_extra`` (the most anonymous memory
    above the start while one tensor was materialised; None where unmeasurable)."""
    head, names = header(tensors, metadata)
    start = _anon_rss()
    peak, largest, total = 0, 0, 0
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in names:
            t = tensors[name].contiguous().detach().to("cpu", DTYPE).reshape(-1).contiguous()
            now = _anon_rss()
            if start is not None and now is not None:
                peak = max(peak, now - start)
            if t.numel():
                f.write(memoryview(t.numpy()).cast("B"))
            largest, total, size = max(largest, t.nbytes), total + t.nbytes, t.nbytes
            del t
            if size >= TRIM_ABOVE:
                _malloc_trim()
    stats = {"tensors": len(names), "bytes": total, "largest": largest, "peak_extra": None if start is None else peak}
    log.debug("wrote %s: %s", path, stats)
    return stats
