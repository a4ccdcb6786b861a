"""The kernel's cgroup (v2): everything about /sys/fs/cgroup/kernel, and nothing else does it.

init mounts cgroup2 and enables the controllers for children (`enable_controllers`). The kernel process and
everything it spawns live in KERNEL; init, the agent and the fork server stay in the root cgroup,
so a runaway kernel (fork bomb, memory hog, busy loop) cannot starve or kill them:
  pids.max     caps the kernel's tasks (processes and threads), default 512
  memory.max   MemTotal minus what the rest of the guest uses when the kernel starts (the fork
               server's imports, the agent, init) minus a reserve (default 160 MiB) for them: the
               kernel's own OOM kill, not a guest-wide one
  memory.high  the high-water mark, a margin below memory.max (default 1/8 of it, 32..128 MiB):
               crossing it makes the guest kernel reclaim (page cache) and raise memory.events,
               which the agent watches (`watch`) to interrupt the cell before the OOM killer fires
  cpu          the whole tree is one scheduling entity beside the agent (a fork bomb's 500
               processes get one share, the agent keeps answering)
Stdlib only; every controller is optional (degrades to what the guest kernel has).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time

ROOT = "/sys/fs/cgroup"
KERNEL = f"{ROOT}/kernel"
WANTED_CONTROLLERS = ("pids", "memory", "cpu")
DEFAULT_PIDS_MAX = 512
# Unless told, at most one task per this much of the kernel's memory limit: a fork bomb of a warm
# Python kernel costs ~2.2 MiB per child (page tables and copied pages; measured under a 520 MiB
# limit: ~250 children), so the task limit must come first, or the bomb meets the OOM killer
# (churn, seconds per kill under TCG, a lost interrupt) instead of a clean EAGAIN from fork().
MIB_PER_TASK = 4
MIN_PIDS_MAX = 64
DEFAULT_MEMORY_RESERVE_MIB = 160
MIN_KERNEL_MEMORY_MIB = 64
# The high-water mark sits this far below memory.max: room for what the cell allocates between
# crossing it and the interrupt landing (a C call in progress finishes first, e.g. a 32 MiB chunk).
MEMORY_MARGIN_DIVISOR = 8
MIN_MEMORY_MARGIN_MIB = 32
MAX_MEMORY_MARGIN_MIB = 128
_IN_MODIFY = 0x2
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enable_controllers() -> list[str]:
    """At boot (init, PID 1, after mounting cgroup2 on ROOT): enable the wanted controllers for
    children. Returns the controllers that children get. Never raises."""
    try:
        available = _read(f"{ROOT}/cgroup.controllers").split()
    except OSError:
        return []
    for name in WANTED_CONTROLLERS:
        if name in available:
            try:
                _write(f"{ROOT}/cgroup.subtree_control", f"+{name}")
            except OSError:
                pass
    try:
        return _read(f"{ROOT}/cgroup.subtree_control").split()
    except OSError:
        return []


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields:
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime in clock ticks since boot) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    return int(fields[1]), int(fields[19])


def boottime_ticks() -> int:
    """Now, on the clock /proc/PID/stat's starttime uses (CLOCK_BOOTTIME, in USER_HZ ticks)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * _CLK_TCK // 1_000_000_000


class KernelCgroup:
    def __init__(self, path: str = KERNEL):
        self.path = path
        self._event_fds: dict[str, int] = {}

    # ---- set up --------------------------------------------------------------------------

    def available(self) -> bool:
        return os.path.exists(f"{ROOT}/cgroup.subtree_control")

    def close(self) -> None:
        """Closes the descriptors kept open (a removed code context's cgroup)."""
        for fd in self._event_fds.values():
            os.close(fd)
        self._event_fds.clear()

    def controllers(self) -> list[str]:
        try:
            return _read(f"{self.path}/cgroup.controllers").split()
        except OSError:
            return []

    def create(self, pids_max: int | None = None, memory_reserve_mib: int = DEFAULT_MEMORY_RESERVE_MIB,
               memory_margin_mib: int | None = None) -> dict:
        """Creates the cgroup if needed and (re)applies the limits. Returns what was applied
        (None for a limit whose controller the guest kernel lacks). pids_max None: DEFAULT_PIDS_MAX,
        or fewer if the memory limit cannot hold that many forked kernels (MIB_PER_TASK).
        memory_margin_mib: how far below memory.max the high-water mark (memory.high) is; None:
        1/MEMORY_MARGIN_DIVISOR of the limit within MIN/MAX_MEMORY_MARGIN_MIB; 0: no mark."""
        os.makedirs(self.path, exist_ok=True)
        have = self.controllers()
        applied: dict = {"pids_max": None, "memory_max": None, "memory_high": None, "controllers": have}
        if "memory" in have:
            # What the rest of the guest uses now (the fork server's imports, the agent, init, the
            # guest kernel's own structures: MemTotal - MemAvailable, while the cgroup has no
            # process) stays theirs, plus the reserve for them to grow into: a runaway kernel then
            # meets its own limit before the guest runs short.
            info = meminfo()
            used = info["MemTotal"] - info.get("MemAvailable", 0)
            limit = max(info["MemTotal"] - used - memory_reserve_mib * 2**20, MIN_KERNEL_MEMORY_MIB * 2**20)
            limit -= limit % 4096
            _write(f"{self.path}/memory.max", str(limit))
            try:
                _write(f"{self.path}/memory.swap.max", "0")  # no swap in the guest; be explicit
            except OSError:
                pass
            applied["memory_max"] = limit
            if memory_margin_mib is None:
                margin = min(max(limit // MEMORY_MARGIN_DIVISOR, MIN_MEMORY_MARGIN_MIB * 2**20),
                             MAX_MEMORY_MARGIN_MIB * 2**20)
            else:
                margin = memory_margin_mib * 2**20
            high = limit - margin - (limit - margin) % 4096 if 0 < margin < limit // 2 else None
            self.set_high(high)
            applied["memory_high"] = high
        if "pids" in have:
            if pids_max is None:
                pids_max = DEFAULT_PIDS_MAX
                if applied["memory_max"]:
                    pids_max = min(pids_max, max(MIN_PIDS_MAX, applied["memory_max"] // (MIB_PER_TASK * 2**20)))
            _write(f"{self.path}/pids.max", str(pids_max))
            applied["pids_max"] = pids_max
        return applied

    def set_high(self, value: int | None) -> None:
        """memory.high: a byte count, or None for no mark ("max")."""
        _write(f"{self.path}/memory.high", "max" if value is None else str(value))

    def watch(self, name: str = "memory.events") -> int | None:
        """An inotify descriptor that becomes readable when the file changes (cgroup v2 files raise
        "modified" when their counters move: checked on Debian's 6.1; the kernel rate-limits it to
        one per 10 ms), or None if the guest cannot. Drain it after each wake-up."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            if libc.inotify_add_watch(fd, f"{self.path}/{name}".encode(), _IN_MODIFY) < 0:
                os.close(fd)
                return None
            return fd
        except (OSError, AttributeError):
            return None

    def enter(self, pid: int = 0) -> None:
        """Moves a process (0: the caller) into the cgroup."""
        _write(f"{self.path}/cgroup.procs", str(pid or os.getpid()))

    # ---- read ----------------------------------------------------------------------------

    def procs(self) -> list[int]:
        try:
            return [int(p) for p in _read(f"{self.path}/cgroup.procs").split()]
        except OSError:
            return []

    def populated(self) -> bool:
        return self.events("cgroup.events").get("populated", 0) == 1

    def events(self, name: str) -> dict[str, int]:
        """A flat keyed file (cgroup.events, pids.events, memory.events) as a dict. The file stays
        open and is re-read with one pread: this is called on the relay's hot path."""
        fd = self._event_fds.get(name)
        try:
            if fd is None:
                fd = self._event_fds[name] = os.open(f"{self.path}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, 4096, 0)
        except OSError:
            return {}
        out = {}
        for line in data.split(b"\n"):
            key, _, value = line.partition(b" ")
            if value:
                out[key.decode()] = int(value)
        return out

    def counter(self, name: str, key: str) -> int:
        return self.events(name).get(key, 0)

    def current(self) -> int | None:
        """memory.current with one pread of a descriptor kept open (cell starts, memory events)."""
        fd = self._event_fds.get("memory.current")
        try:
            if fd is None:
                fd = self._event_fds["memory.current"] = os.open(f"{self.path}/memory.current", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(fd, 64, 0))
        except (OSError, ValueError):
            return None

    def value(self, name: str) -> int | None:
        """A single-value file (pids.current, memory.max, ...); None if absent, -1 for "max"."""
        try:
            text = _read(f"{self.path}/{name}").strip()
        except OSError:
            return None
        return -1 if text == "max" else int(text)

    def memory_stat(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, _, v in (line.partition(" ") for line in _read(f"{self.path}/memory.stat").splitlines()) if v}
        except (OSError, ValueError):
            return {}

    def pinned(self, current: int) -> int:
        """What of memory.current the guest kernel cannot reclaim: it has no swap, so everything
        but the page cache (tmpfs and shared memory are swap-backed: they stay)."""
        stat = self.memory_stat()
        return current - stat.get("file", 0) + stat.get("shmem", 0)

    def stats(self) -> dict:
        return {
            "procs": len(self.procs()),
            "pids_current": self.value("pids.current"),
            "pids_max": self.value("pids.max"),
            "memory_current": self.value("memory.current"),
            "memory_max": self.value("memory.max"),
            "memory_high": self.value("memory.high"),
            "oom_kills": self.counter("memory.events", "oom_kill"),
            "pids_max_events": self.counter("pids.events", "max"),
        }

    # ---- freeze, kill --------------------------------------------------------------------

    def _wait_event(self, key: str, want: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while self.events("cgroup.events").get(key) != want:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def request_freeze(self) -> None:
        """Every task in the cgroup stops on its way back to user space, and a new one is born
        stopped; a fatal signal still kills a frozen task."""
        _write(f"{self.path}/cgroup.freeze", "1")

    def is_frozen(self) -> bool:
        return self.events("cgroup.events").get("frozen") == 1

    def freeze(self, timeout: float = 5.0) -> bool:
        """True once every task is frozen (within the timeout)."""
        self.request_freeze()
        return self._wait_event("frozen", 1, timeout)

    def thaw(self) -> None:
        _write(f"{self.path}/cgroup.freeze", "0")

    def kill_all(self, timeout: float = 10.0) -> bool:
        """Kills every process in the cgroup and waits until it is empty. cgroup.kill (Linux 5.14)
        is atomic against forks; without it: freeze, SIGKILL each, thaw."""
        if not os.path.isdir(self.path):
            return True
        try:
            _write(f"{self.path}/cgroup.kill", "1")
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.EACCES):
                raise
            frozen = self.freeze(timeout / 2)
            try:
                for pid in self.procs():
                    _kill(pid)
            finally:
                self.thaw()
            if not frozen:  # stragglers forked while we were not frozen
                for pid in self.procs():
                    _kill(pid)
        return self._wait_event("populated", 0, timeout)

    def wait_gone(self, pids: set[int], timeout: float = 5.0) -> bool:
        """Until none of `pids` is in the cgroup (an exited process leaves it as it becomes a zombie)."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while pids & set(self.procs()):
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
