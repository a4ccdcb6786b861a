"""PID 1 of the guest: the chores of an init, and nothing else.

Mounts the kernel filesystems (cgroup2 with the pids, memory and cpu controllers enabled for the
kernel's cgroup: vmcell_guest/cgroup.py), brings loopback up (ipykernel binds to it), names the host, runs the
agent (restarting it if it dies), reaps every orphan, and powers the VM off cleanly on SIGTERM
(the agent's `poweroff` op sends that).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
RB_POWER_OFF = 0x4321FEDC
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1

MOUNTS = [
    # (source, target, fstype, flags, options)
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"),
    ("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=32m"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
]


class _PowerOff(Exception):
    pass


def log(message: str) -> None:
    print(f"vmcell-init: {message}", file=sys.stderr, flush=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def spawn_agent() -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-u", "-m", "vmcell_guest.agent"])
        finally:
            os._exit(127)
    return pid


def power_off() -> None:
    log("powering off")
    os.kill(-1, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(-1, signal.SIGKILL)
    os.sync()
    _libc.reboot(RB_POWER_OFF)


def main() -> None:
    for spec in MOUNTS:
        try:
            mount(*spec)
        except OSError as exc:
            log(str(exc))
    from .cgroup import enable_controllers

    controllers = enable_controllers()
    if "pids" not in controllers or "memory" not in controllers:
        log(f"cgroup controllers for the kernel: {controllers or 'none'} (pids and memory wanted)")
    for d in ("/tmp", "/root"):
        os.makedirs(d, exist_ok=True)
    os.chmod("/tmp", 0o1777)
    try:
        loopback_up()
    except OSError as exc:
        log(f"loopback: {exc}")
    socket.sethostname("vmcell")

    def on_term(signum, frame):
        # Raising is what interrupts os.wait(): PEP 475 would otherwise retry it forever.
        raise _PowerOff

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    agent = spawn_agent()
    restarts = 0
    try:
        while True:
            try:
                pid, status = os.wait()  # reaps orphans too: they are reparented to us
            except ChildProcessError:
                pid, status = -1, 0
                time.sleep(0.1)
            if pid == agent:
                restarts += 1
                log(f"agent exited (status {status}); restart #{restarts}")
                time.sleep(min(2.0, 0.1 * restarts))
                agent = spawn_agent()
    except _PowerOff:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    power_off()


if __name__ == "__main__":
    main()
