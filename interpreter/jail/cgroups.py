"""Host cgroups for each VM's QEMU: CPU, memory and process limits (one place for v1 and v2).

Detected, never assumed: a cgroup2 hierarchy that offers the memory and pids controllers is used
(v2, e.g. a systemd host); otherwise the v1 hierarchies of cpu, memory and pids (this machine kind
mounts v1 controllers plus an empty cgroup2 at /sys/fs/cgroup/unified). Each VM gets
`<the server's own cgroup>/vmcell/<vm id>` in each hierarchy, so VMs stay inside whatever limits
the server itself runs under (a container, a systemd unit). On v2 the server's own cgroup may hold
processes, which forbids enabling controllers for children: the server then moves itself into a
`server` leaf beside `vmcell`, as systemd's delegation model expects.

Limits of a VM (CgroupLimits, from the VM's config, see jailer.py):
  cpu     a quota of `vcpus` cores per period: a runaway VM uses at most its own vCPUs' worth
  memory  guest RAM + QEMU's own overhead: a QEMU bug (or a leak) is OOM-killed in its cgroup, not
          the host's processes
  pids    QEMU's threads (vCPUs, I/O workers, migration) with room, never a fork storm
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vmcell.jail")

CPU_PERIOD_US = 100_000
_CONTROLLERS = ("cpu", "memory", "pids")
_REQUIRED = ("memory", "pids")


@dataclass(frozen=True)
class CgroupLimits:
    cpu_cores: float
    memory_bytes: int
    pids_max: int


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mounts(mounts_file: str) -> list[tuple[str, str, set[str]]]:
    out = []
    with open(mounts_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                out.append((fields[1], fields[2], set(fields[3].split(","))))
    return out


def _own_paths(cgroup_file: str) -> dict[str, str]:
    """The server's own cgroup per controller ("" key: the v2 hierarchy)."""
    paths = {}
    with open(cgroup_file) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


class HostCgroups:
    """Per-VM cgroups under one base directory per hierarchy."""

    version: str

    def __init__(self, bases: dict[str, Path]):
        self.bases = bases  # controller -> the `vmcell` directory in its hierarchy (v2: one for all)

    def describe(self) -> str:
        where = ", ".join(sorted({str(p) for p in self.bases.values()}))
        return f"cgroup {self.version} ({', '.join(sorted(self.bases))}) under {where}"

    def _dirs(self, name: str) -> list[Path]:
        return sorted({base / name for base in self.bases.values()})

    def create(self, name: str, limits: CgroupLimits) -> tuple[Path, ...]:
        """Creates the VM's cgroups with their limits; returns the cgroup.procs files to join."""
        for directory in self._dirs(name):
            directory.mkdir(exist_ok=True)
        self._apply(name, limits)
        return tuple(d / "cgroup.procs" for d in self._dirs(name))

    def _apply(self, name: str, limits: CgroupLimits) -> None:
        raise NotImplementedError

    def remove(self, name: str, timeout: float = 2.0) -> None:
        """Removes the VM's cgroups once its processes have left them (an exiting process may take
        a moment)."""
        deadline = time.monotonic() + timeout
        for directory in self._dirs(name):
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("cgroup %s not removed: %s", directory, exc)
                        break
                    time.sleep(0.02)

    def names(self) -> set[str]:
        """The VM cgroups that exist (a janitor removes those of VMs that are gone)."""
        found: set[str] = set()
        for base in self.bases.values():
            if base.is_dir():
                found |= {p.name for p in base.iterdir() if p.is_dir()}
        return found

    def reap_empty(self, min_age_s: float) -> list[str]:
        """Removes VM cgroups with no process that are older than `min_age_s` (rmdir refuses a
        cgroup that still has one)."""
        reaped = []
        for name in self.names():
            dirs = self._dirs(name)
            try:
                if any(time.time() - d.stat().st_mtime < min_age_s for d in dirs if d.exists()):
                    continue
                if any((d / "cgroup.procs").read_text().strip() for d in dirs if d.exists()):
                    continue
            except OSError:
                continue
            self.remove(name, timeout=0)
            reaped.append(name)
        return reaped

    def of_pid(self, pid: int) -> str | None:
        """The VM cgroup name a process is in, if any (tests and `doctor`)."""
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                path = line.rstrip("\n").split(":", 2)[2]
                if "/vmcell/" in path:
                    return path.rsplit("/", 1)[1]
        return None

    def limits_file(self, name: str, controller: str, v1_file: str, v2_file: str) -> Path:
        return self.bases[controller] / name / (v1_file if self.version == "v1" else v2_file)


class CgroupV1(HostCgroups):
    version = "v1"

    def _apply(self, name: str, limits: CgroupLimits) -> None:
        if "cpu" in self.bases:
            cpu = self.bases["cpu"] / name
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(int(limits.cpu_cores * CPU_PERIOD_US)))
        memory = self.bases["memory"] / name
        _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
        _write(self.bases["pids"] / name / "pids.max", str(limits.pids_max))


class CgroupV2(HostCgroups):
    version = "v2"

    def _apply(self, name: str, limits: CgroupLimits) -> None:
        directory = self.bases["memory"] / name
        if "cpu" in self.bases:
            _write(directory / "cpu.max", f"{int(limits.cpu_cores * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        _write(directory / "memory.max", str(limits.memory_bytes))
        try:
            _write(directory / "memory.swap.max", "0")
        except OSError:
            pass  # no swap accounting on this host
        _write(directory / "pids.max", str(limits.pids_max))


def _prepare_v2(mount: Path, own: str, controllers: list[str]) -> Path:
    """`<own cgroup>/vmcell` with the controllers enabled for its children."""
    own_dir = mount / own.lstrip("/")
    base = own_dir / "vmcell"
    base.mkdir(exist_ok=True)
    wanted = " ".join(f"+{c}" for c in controllers)
    try:
        _write(own_dir / "cgroup.subtree_control", wanted)
    except OSError as exc:
        if exc.errno != errno.EBUSY or own_dir == mount:
            raise
        # Our own cgroup holds processes (us): move them into a leaf, then enable for children.
        leaf = own_dir / "server"
        leaf.mkdir(exist_ok=True)
        for pid in (own_dir / "cgroup.procs").read_text().split():
            try:
                _write(leaf / "cgroup.procs", pid)
            except OSError:
                pass
        _write(own_dir / "cgroup.subtree_control", wanted)
    _write(base / "cgroup.subtree_control", wanted)
    return base


def detect_host_cgroups(mounts_file: str = "/proc/self/mounts",
                        cgroup_file: str = "/proc/self/cgroup") -> tuple[HostCgroups | None, str]:
    """The host's cgroups for VMs, or None and why not."""
    try:
        mounts = _mounts(mounts_file)
        own = _own_paths(cgroup_file)
    except OSError as exc:
        return None, f"cgroups unreadable: {exc}"
    reasons = []
    for mount, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        try:
            available = (Path(mount) / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if not all(c in available for c in _REQUIRED):
            reasons.append(f"the cgroup2 at {mount} offers no memory/pids controllers (they are on v1)")
            continue
        controllers = [c for c in _CONTROLLERS if c in available]
        try:
            base = _prepare_v2(Path(mount), own.get("", "/"), controllers)
        except OSError as exc:
            reasons.append(f"cgroup2 at {mount} is not delegated to us ({exc})")
            continue
        return CgroupV2({c: base for c in controllers}), "cgroup v2"
    bases: dict[str, Path] = {}
    for mount, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for controller in _CONTROLLERS:
            if controller in options and controller not in bases:
                base = Path(mount) / own.get(controller, "/").lstrip("/") / "vmcell"
                try:
                    base.mkdir(exist_ok=True)
                    if not os.access(base, os.W_OK):
                        raise PermissionError(f"{base} is not writable")
                except OSError as exc:
                    reasons.append(f"v1 {controller}: {exc}")
                    continue
                bases[controller] = base
    if all(c in bases for c in _REQUIRED):
        return CgroupV1(bases), "cgroup v1"
    return None, "; ".join(reasons) or "no usable cgroup hierarchy with memory and pids controllers"
