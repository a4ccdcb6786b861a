"""Per-VM working directories and the janitor that reaps what a dead owner left behind.

Each VM gets $VMCELL_HOME/run/<id>/ (durable sessions: the state dir's vms/<id>/) holding its disk
overlay, the server's records `owner` (pid and start time of the process that made it) and
`qemu.pid`, QEMU's stderr log, and `vmm/`: QEMU's sockets and console log, the only directory a
jailed QEMU may write (interpreter/jail/): the records the server trusts stay out of its reach. A VM dies
with its owner (PR_SET_PDEATHSIG), and the next owner to start removes any directory whose owner
is gone, killing a QEMU that still runs from it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import run_dir

log = logging.getLogger("vmcell.vm")

# Unix socket paths are limited to 107 bytes; ours end in "/<id>/vmm/snapshot.sock".
VMM_DIR = "vmm"
_MAX_SOCKET_PATH = 107


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live process, or None: tells pid reuse apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _alive(record: dict) -> bool:
    pid, started = record.get("pid"), record.get("start_time")
    return isinstance(pid, int) and pid > 0 and process_start_time(pid) == started


@dataclass
class Workdir:
    id: str
    path: Path

    @classmethod
    def create(cls, root: Path | None = None, owner: dict | None = None) -> "Workdir":
        """`owner`: who keeps it (default: this process, so the janitor reaps it once we are gone;
        a registry's durable sessions live under their own root, which the janitor never visits)."""
        root = root or run_dir()
        root.mkdir(parents=True, exist_ok=True)
        vm_id = secrets.token_hex(6)
        path = root / vm_id
        if len(str(path / VMM_DIR / "snapshot.sock")) > _MAX_SOCKET_PATH:
            raise OSError(f"VMCELL_HOME is too deep for Unix socket paths ({path}); choose a shorter one")
        path.mkdir(mode=0o700)
        (path / VMM_DIR).mkdir(mode=0o700)
        me = os.getpid()
        owner = owner or {"pid": me, "start_time": process_start_time(me)}
        (path / "owner").write_text(json.dumps(owner))
        return cls(vm_id, path)

    @classmethod
    def existing(cls, path: Path) -> "Workdir":
        return cls(path.name, path)

    def file(self, name: str) -> Path:
        return self.path / name

    def vmm_dir(self) -> Path:
        path = self.path / VMM_DIR
        path.mkdir(mode=0o700, exist_ok=True)  # a directory made before VMM_DIR existed gets one too
        return path

    def vmm_file(self, name: str) -> Path:
        """A file of QEMU's own (socket, console log), in the directory it may write."""
        return self.path / VMM_DIR / name

    def record_qemu(self, pid: int, **jail) -> None:
        """`jail`: the uid and cgroup of a jailed QEMU, for a later server that adopts it."""
        record = {"pid": pid, "start_time": process_start_time(pid), **jail}
        (self.path / "qemu.pid").write_text(json.dumps(record))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def read_record(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _young(path: Path, seconds: float = 60.0) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def kill_recorded_qemu(path: Path, why: str) -> None:
    """SIGKILL to the QEMU recorded in a VM directory, if that very process (pid + start time) runs."""
    qemu = read_record(path / "qemu.pid")
    if _alive(qemu):
        try:
            os.kill(qemu["pid"], signal.SIGKILL)
            log.warning("killed qemu pid %s of %s: %s", qemu["pid"], path.name, why)
        except ProcessLookupError:
            pass


def remove_vm_dir(path: Path, why: str) -> None:
    """A VM directory nobody owns any more: its QEMU killed (if that very process still runs), then gone."""
    kill_recorded_qemu(path, why)
    shutil.rmtree(path, ignore_errors=True)


def reap_stale_workdirs(root: Path | None = None) -> list[str]:
    """Kills QEMUs and removes directories whose owner process is gone. Returns the reaped ids."""
    root = root or run_dir()
    if not root.is_dir():
        return []
    reaped = []
    for path in root.iterdir():
        if not path.is_dir():
            continue
        owner = read_record(path / "owner")
        if _alive(owner) or (not owner and _young(path)):  # a young one may be mid-creation
            continue
        remove_vm_dir(path, "its owner is gone")
        reaped.append(path.name)
    if reaped:
        log.info("reaped %d stale VM directories: %s", len(reaped), ", ".join(reaped))
    return reaped
