"""Guest RAM images that several VMs map, handed to jailed QEMUs as sealed memfds.

A session maps its template's RAM image (or its fork parent's capture) copy-on-write. QEMU 7.2
opens a `memory-backend-file` read-write even for a private mapping, and its `readonly=on` maps the
guest RAM read-only, which a guest cannot run on. Letting every jailed uid write the shared image
would let one compromised QEMU change the memory of every session restored from it. So the image
is copied once into a memfd sealed against writes, growth and shrinking: QEMU may open it
read-write (a memfd's mode allows it) and map it privately, but no write reaches it: F_SEAL_WRITE
refuses write(2), fallocate and shared writable mappings. QEMU reaches the fd, inherited, as
/proc/self/fd/N (the jail's own procfs).

Cost: the image's data (not its holes) is copied once per image (a template's: ~400 MB, 0.2-0.5 s)
and stays in shared memory while the server runs (in page cache before). A VM's reads of holes
fill them in the memfd (a fork's capture reads all of the parent's RAM): at most the guest's RAM
size, once per image, shared by all its sessions.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("vmcell.jail")

_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_CHUNK = 8 << 20


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copies the data extents of `src` into `dst` at the same offsets; holes stay holes."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(src, start, os.SEEK_HOLE)
        while start < end:
            chunk = os.pread(src, min(_CHUNK, end - start), start)
            if not chunk:
                return
            os.pwrite(dst, chunk, start)
            start += len(chunk)
        offset = end


def sealed_copy(path: Path) -> int:
    """A new sealed memfd holding `path`'s bytes. Blocking: call it off the IO loop."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        fd = os.memfd_create(f"vmcell-ram:{path.parent.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            _copy_data(src, fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(src)


class SealedImages:
    """One sealed memfd per RAM image in use, made on first use, closed once its file is gone (a
    fork capture released with its last child, a superseded saved state). VMs already running keep
    their mapping of it either way."""

    def __init__(self) -> None:
        self._fds: dict[tuple[Path, int, int], int] = {}
        self._lock = threading.Lock()  # fd_for runs in worker threads

    @staticmethod
    def _key(path: Path) -> tuple[Path, int, int]:
        st = path.stat()
        return (path, st.st_ino, st.st_mtime_ns)

    def fd_for(self, path: Path) -> int:
        """The memfd of `path` (the same fd for as long as the file is unchanged). Blocking."""
        key = self._key(path)
        with self._lock:
            self._sweep()
            fd = self._fds.get(key)
            if fd is None:
                fd = self._fds[key] = sealed_copy(path)
                log.debug("sealed a copy of %s in memfd %d", path, fd)
            return fd

    def sweep(self) -> None:
        with self._lock:
            self._sweep()

    def _sweep(self) -> None:
        for key, fd in list(self._fds.items()):
            try:
                current = self._key(key[0])
            except OSError:
                current = None
            if current != key:
                del self._fds[key]
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
