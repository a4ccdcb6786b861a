"""Giving back the guest RAM pages a capture faulted in (Linux).

QEMU streams a session's whole RAM when it captures it (QemuVM.snapshot): the RAM is a private
mapping of a base image, so reading every page maps every page, holes included (the kernel fills a
page-cache page with zeros for each). A forked parent runs on holding all of them: measured here
(TCG, 1 GiB guest) its PSS went from ~70 MiB to ~1040 MiB, since no other process maps those pages.
After the capture, the pages it did not hold before are paged out with process_madvise(MADV_PAGEOUT):
the kernel drops clean file pages only this VM maps and leaves the rest (pages other sessions share,
the VM's own copy-on-write pages). That needs CAP_SYS_NICE (and Linux >= 5.10); without it the pages
stay mapped until memory pressure reclaims them, as any clean page cache.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SYS_PIDFD_OPEN, _SYS_PROCESS_MADVISE = 434, 440  # x86-64 and aarch64 alike (the generic table)
_MADV_PAGEOUT = 21
_IOV_MAX = 1024
# Top byte of a /proc/PID/pagemap entry: bit 63 present, bit 62 swapped.
_RESIDENT = bytes(1 if byte & 0xC0 else 0 for byte in range(256))


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def mapping_of(pid: int, path: Path) -> tuple[int, int] | None:
    """Start and end address of the process's mapping of `path` (the guest RAM image), if any."""
    wanted = str(Path(path).resolve())  # /proc shows the path QEMU opened, symlinks resolved
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == wanted:
                start, end = fields[0].split("-")
                return int(start, 16), int(end, 16)
    return None


def resident_pages(pid: int, start: int, end: int) -> bytes:
    """One byte per page of [start, end): 1 if the page is mapped (or swapped out), else 0."""
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(start // PAGE_SIZE * 8)
        entries = pagemap.read((end - start) // PAGE_SIZE * 8)
    return entries[7::8].translate(_RESIDENT)  # little-endian: every 8th byte is an entry's top byte


def absent_ranges(resident: bytes, start: int) -> list[tuple[int, int]]:
    """(address, length) of each run of pages `resident` marks absent, from address `start`."""
    return [(start + m.start() * PAGE_SIZE, (m.end() - m.start()) * PAGE_SIZE)
            for m in re.finditer(rb"\x00+", resident)]


def page_out(pid: int, ranges: list[tuple[int, int]]) -> None:
    """process_madvise(MADV_PAGEOUT) over `ranges` of another process. Raises OSError (EPERM
    without CAP_SYS_NICE, ENOSYS before Linux 5.10, ESRCH once it exited)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    try:
        for first in range(0, len(ranges), _IOV_MAX):
            batch = ranges[first:first + _IOV_MAX]
            iovecs = (_IOVec * len(batch))(*(_IOVec(address, length) for address, length in batch))
            if libc.syscall(_SYS_PROCESS_MADVISE, pidfd, iovecs, len(batch), _MADV_PAGEOUT, 0) < 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
    finally:
        os.close(pidfd)
