"""What every benchmark says about where it ran, and how it waits for the device before reading a clock."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> str:
    """Host, CPUs, memory, GPU and versions: the line a benchmark's figures are quoted with."""
    mem = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM"
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}){mem}, {gpu}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}"
    )


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a timer measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
