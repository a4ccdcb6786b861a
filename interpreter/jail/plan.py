"""What a jail is made of, decided in the server and applied in QEMU's child process (enter.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bind:
    """A host file or directory that appears in the jail at the same path."""

    source: Path
    writable: bool = False
    device: bool = False  # a device node (/dev/null, /dev/kvm): its mount keeps device access


@dataclass(frozen=True)
class JailPlan:
    root: Path  # an empty directory: the jail's tmpfs is mounted on it, in the child's namespace only
    uid: int
    gid: int
    binds: tuple[Bind, ...]
    cgroup_procs: tuple[Path, ...]  # cgroup.procs files the child joins before it is jailed
    last_capability: int  # /proc/sys/kernel/cap_last_cap: every capability up to it is dropped
