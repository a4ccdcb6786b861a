"""The jailer: what confinement this host allows, and each VM's jail made from its config.

Like Firecracker's jailer, but in-process: the server decides (JailPlan) and the QEMU child applies
it between fork and exec (enter.py), so a restore pays no extra exec. Per VM:
  - a uid of its own (uids.py) and its gid, no capabilities, no_new_privs;
  - a mount namespace showing only its files (files.py): QEMU's binary, libraries and firmware
    read-only, its kernel, initramfs, base images and backing files read-only, its overlay disk and
    its `vmm/` directory (sockets, console log) writable, a shared RAM image as a sealed memfd
    (sealed_ram.py), /dev/null and /dev/urandom, and a procfs that shows only itself;
  - cgroups with CPU, memory and pids limits (cgroups.py);
  - QEMU's seccomp filter (`-sandbox`, always, jail or not: qemu.py).
The server's own files stay root's: a VM directory is root's (0700) with the records the server
trusts (owner, qemu.pid, qemu.log); only `vmm/` and the overlay disk beside it are lent to the VM's uid.

Needs root (CAP_SYS_ADMIN for the namespace and mounts, CAP_SETUID). Without it there is no jail,
and `vmcell doctor` and the server's log say so; VMCELL_JAIL=off turns it off (also said).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..config import QEMU_BINARY, QEMU_CPU_RESERVE_CORES, QEMU_MEMORY_OVERHEAD_MIB, QEMU_PIDS_MAX, vmcell_home
from ..vm.backend import VMConfig
from ..vm.workdir import Workdir
from .cgroups import CgroupLimits, HostCgroups, detect_host_cgroups
from .files import backing_chain, qemu_runtime_files
from .plan import Bind, JailPlan
from .sealed_ram import SealedImages
from .uids import UidAllocator

log = logging.getLogger("vmcell.jail")

_DEVICES = (Path("/dev/null"), Path("/dev/urandom"))


@dataclass(frozen=True)
class Confinement:
    """What confinement QEMUs get here, and why any part is missing (doctor, /health, logs)."""

    jail: bool
    jail_reason: str
    cgroups: bool
    cgroups_reason: str

    def as_dict(self) -> dict:
        return {"jail": self.jail, "jail_reason": self.jail_reason, "cgroups": self.cgroups,
                "cgroups_reason": self.cgroups_reason}

    def lines(self) -> list[tuple[bool, str]]:
        return [(self.jail, f"QEMU jail (own uid, mount namespace, no capabilities, no_new_privs): "
                            f"{self.jail_reason}"),
                (self.cgroups, f"QEMU cgroups (cpu, memory, pids limits): {self.cgroups_reason}")]


@dataclass
class Launch:
    """One jailed start: what the child applies, and what the server gives back when QEMU is gone."""

    plan: JailPlan
    cgroup: str | None
    memory_fd: int | None  # a sealed memfd QEMU maps (its mem-path is /proc/self/fd/N)
    lent: list[Path] = field(default_factory=list)  # chowned to the VM's uid, given back at release

    @property
    def uid(self) -> int:
        return self.plan.uid

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.memory_fd is None else (self.memory_fd,)


def jail_limits(config: VMConfig, host_cores: int | None = None) -> CgroupLimits:
    """CPU: the VM's vCPUs' worth, but never the host's last `QEMU_CPU_RESERVE_CORES` cores: a VM
    pinning all its vCPUs leaves the server and the other sessions room (on a 2-core host, 1 core)."""
    host_cores = host_cores or len(os.sched_getaffinity(0))
    return CgroupLimits(cpu_cores=float(min(config.vcpus, max(1, host_cores - QEMU_CPU_RESERVE_CORES))),
                        memory_bytes=(config.memory_mib + QEMU_MEMORY_OVERHEAD_MIB) * 2**20,
                        pids_max=QEMU_PIDS_MAX)


_DETECTED: dict[tuple, tuple["Jailer | None", Confinement]] = {}
_DETECTED_LOCK = threading.Lock()


class Jailer:
    def __init__(self, root: Path, cgroups: HostCgroups | None, uids: UidAllocator | None = None):
        self.root = root  # an empty directory: each jail's tmpfs is mounted on it in its own namespace
        self.cgroups = cgroups
        self.uids = uids or UidAllocator()
        self.sealed = SealedImages()
        with open("/proc/sys/kernel/cap_last_cap") as f:
            self.last_capability = int(f.read())

    @classmethod
    def detect(cls) -> tuple["Jailer | None", Confinement]:
        """The jailer this host allows (None: no jail) and the confinement report. Blocking. One per
        process (and setting): every manager's VMs share its uid range, its cgroup base and, above
        all, its sealed RAM images: a copy per manager would hold a template's RAM once per manager."""
        key = (os.environ.get("VMCELL_JAIL", "on").strip().lower(), str(vmcell_home()), os.geteuid())
        with _DETECTED_LOCK:
            if key not in _DETECTED:
                _DETECTED[key] = cls._detect()
            return _DETECTED[key]

    @classmethod
    def _detect(cls) -> tuple["Jailer | None", Confinement]:
        unjailed = "off: applied to jailed QEMUs only"
        if os.environ.get("VMCELL_JAIL", "on").strip().lower() in ("off", "0", "no", "false"):
            return None, Confinement(False, "off: VMCELL_JAIL=off", False, unjailed)
        if os.geteuid() != 0:
            return None, Confinement(False, "off: the server does not run as root, so it cannot give QEMU "
                                            "another uid, a mount namespace or cgroups (QEMU still runs under "
                                            "its seccomp filter)", False, unjailed)
        try:
            qemu_runtime_files(Path(QEMU_BINARY))
        except Exception as exc:  # noqa: BLE001 - whatever fails here means: no jail, and why
            return None, Confinement(False, f"off: QEMU's files could not be listed ({exc})", False, unjailed)
        root = vmcell_home() / "jail-root"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        cgroups, cgroups_reason = detect_host_cgroups()
        jailer = cls(root, cgroups)
        if reaped := jailer.reap_cgroups():
            log.info("removed %d empty VM cgroups left behind: %s", len(reaped), ", ".join(reaped))
        return jailer, Confinement(True, "on (a uid per VM)", cgroups is not None,
                                   cgroups.describe() if cgroups else f"off: {cgroups_reason}")

    # ---- one VM -------------------------------------------------------------------------------

    def prepare(self, config: VMConfig, workdir: Workdir) -> Launch:
        """Everything a jailed start needs, made ready (blocking: run it off the IO loop)."""
        uid = self.uids.take()
        try:
            return self._prepare(config, workdir, uid)
        except BaseException:
            self.uids.release(uid)
            raise

    def _prepare(self, config: VMConfig, workdir: Workdir, uid: int) -> Launch:
        vmm = workdir.vmm_dir()
        binds = [Bind(p) for p in qemu_runtime_files(Path(QEMU_BINARY))]
        binds += [Bind(d, device=True) for d in _DEVICES]
        if config.accel.name == "kvm":
            binds.append(Bind(Path("/dev/kvm"), writable=True, device=True))
        binds += [Bind(config.kernel), Bind(config.initramfs), Bind(vmm, writable=True)]
        lent = [vmm]
        for drive in config.drives:
            binds.append(Bind(drive.path, writable=not drive.read_only))
            binds += [Bind(p) for p in backing_chain(drive.path)]
            if not drive.read_only:
                lent.append(drive.path)
        memory_fd = None
        if config.memory_file is not None:
            if config.memory_file.shared:  # a template being built: its RAM is written to the file
                config.memory_file.path.touch(mode=0o600)  # QEMU sizes it; a bind needs it to exist
                binds.append(Bind(config.memory_file.path, writable=True))
                lent.append(config.memory_file.path)
            else:
                memory_fd = self.sealed.fd_for(config.memory_file.path)
        for path in lent:
            _chown_tree(path, uid)
        cgroup = None
        procs: tuple[Path, ...] = ()
        if self.cgroups is not None:
            procs = self.cgroups.create(workdir.id, jail_limits(config))
            cgroup = workdir.id
        plan = JailPlan(root=self.root, uid=uid, gid=uid, binds=tuple(_dedupe(binds)), cgroup_procs=procs,
                        last_capability=self.last_capability)
        return Launch(plan, cgroup, memory_fd, lent)

    def adopt(self, uid: object, cgroup: object) -> Launch | None:
        """A VM a previous server started (its qemu.pid record): its uid is held again."""
        if not isinstance(uid, int) or not self.uids.hold(uid):
            return None
        plan = JailPlan(self.root, uid, uid, (), (), self.last_capability)
        return Launch(plan, cgroup if isinstance(cgroup, str) else None, None, [])

    def release(self, launch: Launch) -> None:
        """QEMU is gone: its cgroups removed, its uid free again, what it was lent given back to root."""
        if launch.cgroup is not None and self.cgroups is not None:
            self.cgroups.remove(launch.cgroup)
        for path in launch.lent:
            _chown_tree(path, 0)
        self.uids.release(launch.uid)
        self.sealed.sweep()  # a fork capture deleted with its last child: its memfd goes too

    def reap_cgroups(self) -> list[str]:
        """Removes empty VM cgroups left behind (a killed server's). Only those older than a minute:
        another server sharing the hierarchy may have made one that its QEMU has yet to join."""
        if self.cgroups is None:
            return []
        return self.cgroups.reap_empty(min_age_s=60.0)



def _chown_tree(path: Path, uid: int) -> None:
    """A lent file, or a lent directory and what is in it (flat: `vmm/` holds no directories). A
    saved session's next QEMU has another uid than the one that wrote its console log."""
    try:
        os.chown(path, uid, uid, follow_symlinks=False)
        if path.is_dir() and not path.is_symlink():
            for entry in os.scandir(path):
                os.chown(entry.path, uid, uid, follow_symlinks=False)
    except FileNotFoundError:
        pass


def _dedupe(binds: list[Bind]) -> list[Bind]:
    """One bind per path (a writable one wins), parents before children."""
    by_path: dict[Path, Bind] = {}
    for bind in binds:
        if bind.source not in by_path or bind.writable:
            by_path[bind.source] = bind
    return sorted(by_path.values(), key=lambda b: len(b.source.parts))
