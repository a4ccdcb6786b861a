"""One uid per VM's QEMU, from a range no account uses.

Why one per VM rather than one system user for all: two QEMUs of the same uid could signal and
ptrace each other (a dumpable process of the same uid is fair game), and each could open the other's
files. With a uid each, a compromised QEMU reaches nothing of another session even before the mount
namespace and seccomp are counted. The gid equals the uid; neither needs an /etc/passwd entry.
"""

from __future__ import annotations

import secrets
import threading

from ..config import JAIL_UID_BASE, JAIL_UID_COUNT


class UidAllocator:
    def __init__(self, base: int = JAIL_UID_BASE, count: int = JAIL_UID_COUNT):
        self.base, self.count = base, count
        self._used: set[int] = set()
        self._lock = threading.Lock()  # taken and released from worker threads (jailer.prepare/release)

    def take(self) -> int:
        with self._lock:
            if len(self._used) >= self.count:
                raise RuntimeError("every jail uid is in use")
            while True:
                uid = self.base + secrets.randbelow(self.count)
                if uid not in self._used:
                    self._used.add(uid)
                    return uid

    def hold(self, uid: int) -> bool:
        """An adopted VM's uid (from its record). False if it is not one of ours."""
        if not self.base <= uid < self.base + self.count:
            return False
        with self._lock:
            self._used.add(uid)
        return True

    def release(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)

    def owns(self, uid: int) -> bool:
        return self.base <= uid < self.base + self.count
