"""Entering a jail: the code that runs in QEMU's process between fork and exec, and nothing else.

It runs as root in the forked child of the server (subprocess's preexec_fn), applies a JailPlan
made in the parent, and leaves a process that exec()s QEMU with:
  - its pid in the VM's cgroups (written before anything else, while /sys is still visible);
  - a mount namespace of its own whose root is a small read-only tmpfs holding only the plan's
    binds, each at its host path (QEMU's binary and libraries, its firmware, this VM's kernel,
    initramfs, images and directory), plus a procfs that shows only its own process;
  - no core dumps (they would hold the guest's RAM);
  - the VM's uid and gid, no supplementary groups, an empty capability bounding set, no ambient
    capabilities (so all capabilities are gone after the uid change), and no_new_privs.
QEMU's own seccomp filter (`-sandbox`) is installed by QEMU itself, early in its startup.

A failure writes one line to stderr (QEMU's log) and exits 127: the parent sees QEMU exit at once
and reports that line (qemu.py's start-up error path), never a half-jailed QEMU.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

from .plan import JailPlan

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
_MNT_DETACH = 2
_SYS_PIVOT_ROOT = 155  # x86_64
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 1, 24, 38, 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
EXIT_JAIL_FAILED = 127

_libc = ctypes.CDLL(None, use_errno=True)


class _Failed(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise _Failed(f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {source or ''} on {target}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _make_target(target: str, directory: bool) -> None:
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if directory:
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.exists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def _build_root(plan: JailPlan) -> None:
    root = str(plan.root)
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("vmcell-jail", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=256k,nr_inodes=2048")
    for bind in plan.binds:
        target = root + str(bind.source)
        _make_target(target, os.path.isdir(bind.source))
        _mount(str(bind.source), target, None, _MS_BIND)
        flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID
        flags |= 0 if bind.device else _MS_NODEV
        flags |= 0 if bind.writable else _MS_RDONLY
        flags |= _MS_NOEXEC if bind.writable else 0  # nothing QEMU can write may be executed
        _mount(None, target, None, flags)
    proc = root + "/proc"
    os.makedirs(proc, mode=0o555, exist_ok=True)
    # Its own process only (hidepid: other uids' processes are invisible, and each VM has its own
    # uid), and no /proc/sys, /proc/kcore, ... (subset=pid). QEMU reads /proc/self/*.
    _mount("proc", proc, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=invisible,subset=pid")
    _mount(None, root, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(root)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "detaching the host's root")
    os.chdir("/")


def _drop_privileges(plan: JailPlan) -> None:
    for cap in range(plan.last_capability + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient capabilities")
    os.setgroups([])
    os.setresgid(plan.gid, plan.gid, plan.gid)
    os.setresuid(plan.uid, plan.uid, plan.uid)  # from root to non-root: permitted and effective sets cleared
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def enter(plan: JailPlan, parent_pid: int, die_with_owner: bool, nice: int) -> None:
    """Runs in the child (as preexec_fn). Returns only when the jail is complete."""
    try:
        for procs in plan.cgroup_procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        if nice:
            os.nice(nice)  # every QEMU thread inherits it
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _build_root(plan)
        _drop_privileges(plan)
        if die_with_owner:
            # After the uid change, which clears the parent-death signal.
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the owner died before prctl took effect
                os._exit(1)
    except (_Failed, OSError) as exc:
        os.write(2, f"vmcell jail: {exc}\n".encode())  # fd 2 is QEMU's log by now
        os._exit(EXIT_JAIL_FAILED)
