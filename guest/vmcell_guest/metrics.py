"""The VM's CPU, memory and disk use (E2B's SandboxMetrics), from /proc and statvfs.

cpu_used_pct is the share of all vCPUs busy over a short sample (SAMPLE_S) taken by the op
itself; memory is MemTotal - MemAvailable; disk is the filesystem of the home directory (the
session's writable layer).
"""

from __future__ import annotations

import os
import time

SAMPLE_S = 0.1
HOME = "/root"


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest and guest_nice are already in user and nice
    return total - idle, total


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def op_metrics(args: dict) -> dict:
    busy0, total0 = _cpu_times()
    time.sleep(SAMPLE_S)
    busy1, total1 = _cpu_times()
    pct = 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    mem = _meminfo()
    disk = os.statvfs(HOME)
    return {
        "cpu_count": os.cpu_count() or 1,
        "cpu_used_pct": round(min(max(pct, 0.0), 100.0), 2),
        "mem_used": mem["MemTotal"] - mem.get("MemAvailable", mem.get("MemFree", 0)),
        "mem_total": mem["MemTotal"],
        "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
        "disk_total": disk.f_blocks * disk.f_frsize,
        "timestamp": time.time(),
    }
