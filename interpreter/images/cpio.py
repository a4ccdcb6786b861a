"""A deterministic newc cpio writer: the initramfs is built without root and without the cpio tool,
and identical inputs give identical bytes (mtime 0, uid/gid 0)."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterable


@dataclass(frozen=True)
class Entry:
    name: str  # path inside the archive, no leading slash
    mode: int  # full st_mode, type bits included
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(out: BinaryIO, entries: Iterable[Entry]) -> None:
    ino = 0
    for entry in [*entries, Entry("TRAILER!!!", 0)]:
        ino += 1
        name = entry.name.encode() + b"\0"
        fields = [ino, entry.mode, 0, 0, 2 if stat.S_ISDIR(entry.mode) else 1, 0, len(entry.data),
                  0, 0, entry.rdev[0], entry.rdev[1], len(name), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + name + _pad(len(header) + len(name)))
        out.write(entry.data + _pad(len(entry.data)))
