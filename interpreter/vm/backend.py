"""The VM backend interface: what sessions and templates need from a VMM, nothing QEMU-specific.

A backend boots a VM from kernel + initramfs + drives, or restores one from a saved state with the
same devices; the VM exposes its guest link as a Unix stream socket on the host (virtio-serial on
QEMU here; a vsock UDS on Firecracker or Cloud Hypervisor would fit the same slot).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from .accel import Accelerator
from .workdir import Workdir


@dataclass(frozen=True)
class Drive:
    path: Path
    read_only: bool = False
    format: str = "raw"  # "raw" or "qcow2"


@dataclass(frozen=True)
class MemoryFile:
    """Guest RAM backed by a file. A template runs with shared=True, so its RAM lands in the file and
    its snapshot need not carry it; sessions map the same file copy-on-write (shared=False): a restore
    reads pages lazily instead of loading them all, and untouched pages stay shared between sessions."""

    path: Path
    shared: bool


@dataclass(frozen=True)
class Snapshot:
    """A VM captured at one instant: its RAM as a raw (sparse) image, its devices' state without the
    RAM, and its writable disk as it was (a qcow2 that new overlays can use as their backing).
    A template's build is one; so are a fork's base and a saved session (vm/ramsplit.py)."""

    memory: Path
    state: Path
    disk: Path | None = None  # None: the caller keeps using the VM's own writable disk

    def missing(self) -> list[str]:
        return [str(p) for p in (self.memory, self.state, self.disk) if p is not None and not p.exists()]


@dataclass(frozen=True)
class VMConfig:
    kernel: Path
    initramfs: Path
    cmdline: str
    vcpus: int
    memory_mib: int
    # Order matters to a restore: the same drives, in the same order, as when the state was saved.
    drives: tuple[Drive, ...]
    accel: Accelerator
    memory_file: MemoryFile | None = None
    extra_cmdline: tuple[str, ...] = field(default=())


class VM(abc.ABC):
    workdir: Workdir
    accel: Accelerator

    @property
    def id(self) -> str:
        return self.workdir.id

    @property
    @abc.abstractmethod
    def link_path(self) -> Path:
        """Host end of the guest link: a Unix stream socket."""

    @property
    @abc.abstractmethod
    def console_log(self) -> Path: ...

    @abc.abstractmethod
    def running(self) -> bool: ...

    @abc.abstractmethod
    async def wait_exit(self, timeout: float) -> int | None:
        """The VMM process's exit status once it has exited (negative: a signal), None if it is
        still running after `timeout` seconds."""

    @abc.abstractmethod
    async def save_state(self, state_file: Path) -> None:
        """Pause the VM and write its device and memory state (the disks are the caller's to keep)."""

    # Every lifecycle operation a session uses, listed once (as Firecracker's rpc_interface does).

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the vCPUs (no CPU is used until resume); memory and devices stay as they are."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Run a paused VM again. Its clock stood still meanwhile: the caller corrects the guest's."""

    @abc.abstractmethod
    async def snapshot(self, directory: Path, copy_disk: bool, runs_on: bool = False) -> Snapshot:
        """Capture the VM (left paused) into `directory`: RAM image, device state and, with
        `copy_disk`, a copy of its writable disk as it is at that instant (for forks). `runs_on`:
        the caller resumes it afterwards, so memory the capture alone needed should be given back."""

    @abc.abstractmethod
    async def detach(self) -> None:
        """Let go of a VM that must outlive us (a server stopping): it keeps running; a later
        process adopts it with VMBackend.attach."""

    @abc.abstractmethod
    def exit_description(self, status: int | None) -> str:
        """How the VMM process ended, in words, from wait_exit's status."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop gracefully, then kill; always reaps the process and removes the workdir."""


class VMBackend(abc.ABC):
    name: str
    # Bumped whenever the VM's devices or memory layout change: saved states of another layout won't restore.
    layout_version: int

    @abc.abstractmethod
    async def boot(self, config: VMConfig, workdir: Workdir) -> VM: ...

    @abc.abstractmethod
    async def restore(self, config: VMConfig, workdir: Workdir, state_file: Path) -> VM: ...

    @abc.abstractmethod
    async def attach(self, config: VMConfig, workdir: Workdir) -> VM:
        """Adopt a VM a previous process started in `workdir` (sessions that outlive a server)."""

    @abc.abstractmethod
    async def overlay(self, backing: Path, path: Path, backing_format: str = "raw") -> Drive:
        """A copy-on-write disk over a read-only image: a session's own writable layer."""

    @abc.abstractmethod
    async def version(self) -> str:
        """The VMM's version: part of a snapshot's key, since states only restore on the same VMM."""
