"""How long a run took from launch to its first finished step (loading, caching, placing).

Printed once per run: it is the figure users feel when they restart a run, and the one
../shared/TARGETS.md sets a target for (≤ 20 s for FLUX.1-dev with the files in the page cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm import tqdm


def seconds_since_launch() -> float | None:
    """Wall time since this process started (from /proc on Linux), or None where unknown."""
    try:
        # field 22 of /proc/self/stat (starttime, in clock ticks after boot); the command name
        # in field 2 may hold spaces, so count from the closing parenthesis
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])   # seconds after boot, to 10 ms
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def report_startup_time(device: torch.device) -> float | None:
    """Print (and return) the seconds from launch to now, after the device's queued work is done.
    Called once, after the first optimizer step, so its one device sync costs nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = seconds_since_launch()
    if elapsed is not None:
        tqdm.write(f"first step done {elapsed:.1f} s after launch")
    return elapsed
