"""Splits a QEMU migration stream into a raw RAM image and a device state without the RAM.

A template's snapshot is two files: memory.bin (the guest's RAM, byte for byte) and state.bin (the
devices, with the RAM left out by QEMU's `x-ignore-shared`). Sessions map memory.bin copy-on-write,
so a restore reads no RAM and untouched pages stay shared. A *running session* cannot be saved that
way by QEMU itself: its RAM is a private (copy-on-write) mapping, which QEMU always streams in full.
This module turns that full stream into the same two files, on the fly, as QEMU sends it:

  - pages of the main RAM block go to the image at their offset (zero pages stay holes: the image
    is sparse, so a 1 GiB guest that uses 300 MiB costs 300 MiB);
  - everything else (the stream header, the RAM section's block list, the small ROM blocks, every
    device section) is copied to the state verbatim.

A VM restored from the pair with `x-ignore-shared` on receives no pages for its RAM block and keeps
what its mapping of the image holds, exactly as a template restore does. Snapshots of forks and
saved sessions are made this way (vm/snapshot.py).

The format handled is QEMU's precopy stream (savevm.c / ram.c, stable since QEMU 4.x): sections
START/PART/END for the iterative "ram" section, FULL for devices, footers. Anything unexpected in
the RAM records (compression, XBZRLE, multifd, postcopy) raises SnapshotError rather than guessing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import SnapshotError

PAGE_SIZE = 4096
_FILE_MAGIC = b"QEVM"
_SECTION_START, _SECTION_PART, _SECTION_END = 0x01, 0x02, 0x03
_SECTION_FOOTER = 0x7E
# RAM record flags (migration/ram.c), in the low bits of each record's 64-bit page address.
_FLAG_ZERO = 0x02
_FLAG_MEM_SIZE = 0x04
_FLAG_PAGE = 0x08
_FLAG_EOS = 0x10
_FLAG_CONTINUE = 0x20
_KNOWN_FLAGS = _FLAG_ZERO | _FLAG_MEM_SIZE | _FLAG_PAGE | _FLAG_EOS | _FLAG_CONTINUE
_FLAG_MASK = PAGE_SIZE - 1
# The RAM section's header: idstr "ram", instance 0, version 4 (after type byte and section id).
_RAM_SECTION_TAIL = b"\x03ram" + struct.pack(">II", 0, 4)
_CONFIG_SEARCH_LIMIT = 64 * 1024
# A stalled migration ends the capture with an error instead of a hang.
RECEIVE_TIMEOUT_S = 60.0
# Pages are written in runs of up to this many bytes (one pwrite per run of consecutive pages).
_RUN_BYTES = 1 << 20


@dataclass(frozen=True)
class SplitResult:
    ram_block: str
    ram_bytes: int  # the block's size (the image's length)
    pages_written: int  # non-zero pages now in the image
    state_bytes: int


class _Reader:
    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self._stream.read(n)
        if len(data) != n:
            raise SnapshotError(f"migration stream ended early at byte {self.offset + len(data)}")
        self.offset += n
        return data

    def u8(self) -> int:
        return self.read(1)[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.read(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.read(8))[0]

    def rest(self, out: BinaryIO, chunk: int = 1 << 20) -> int:
        total = 0
        while data := self._stream.read(chunk):
            out.write(data)
            total += len(data)
        self.offset += total
        return total


class _Image:
    """The sparse RAM image, written in runs of consecutive pages."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.pages = 0
        self._written = bytearray(size // PAGE_SIZE + 1)  # a page sent twice may turn to zero
        self._start = -1
        self._run: list[bytes] = []
        self._run_bytes = 0

    def page(self, offset: int, data: bytes) -> None:
        if self._run and offset != self._start + self._run_bytes or self._run_bytes >= _RUN_BYTES:
            self.flush()
        if not self._run:
            self._start = offset
        self._written[offset // PAGE_SIZE] = 1
        self._run.append(data)
        self._run_bytes += len(data)
        self.pages += 1

    def zero(self, offset: int) -> None:
        if self._written[offset // PAGE_SIZE]:
            self.page(offset, bytes(PAGE_SIZE))

    def flush(self) -> None:
        if self._run:
            os.pwrite(self.fd, b"".join(self._run), self._start)
            self._run, self._run_bytes = [], 0


def split_stream(stream: BinaryIO, image_path: str, state: BinaryIO, ram_block: str = "ram") -> SplitResult:
    """Reads a whole precopy migration stream (saved with `x-ignore-shared` on) from `stream`; writes
    block `ram_block`'s pages into a new sparse image at `image_path` and the rest to `state`."""
    reader = _Reader(stream)
    head = reader.read(8)
    if head[:4] != _FILE_MAGIC:
        raise SnapshotError("not a QEMU migration stream (bad magic)")
    # The configuration section (machine type, capabilities) is not self-delimiting: the RAM
    # section's START header, which follows it, is found by its exact bytes.
    prefix = bytearray(head)
    while True:
        prefix += reader.read(1)
        at = len(prefix) - len(_RAM_SECTION_TAIL)
        if at >= 5 and prefix[at:] == _RAM_SECTION_TAIL and prefix[at - 5] == _SECTION_START:
            break
        if len(prefix) > _CONFIG_SEARCH_LIMIT:
            raise SnapshotError("migration stream has no RAM section where one was expected")
    section_id = struct.unpack_from(">I", prefix, at - 4)[0]
    state.write(prefix)

    fd = os.open(image_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        blocks = _setup_records(reader, state)
        if ram_block not in blocks:
            raise SnapshotError(f"migration stream has no RAM block {ram_block!r} (blocks: {sorted(blocks)})")
        ram_bytes = blocks[ram_block]
        os.ftruncate(fd, ram_bytes)
        image = _Image(fd, ram_bytes)
        _footer(reader, state, section_id)
        block = None  # a CONTINUE record means "the block of the previous record", across sections
        while True:
            kind = reader.u8()
            if kind not in (_SECTION_PART, _SECTION_END) or reader.be32() != section_id:
                raise SnapshotError(f"unexpected section type {kind:#x} inside the RAM iteration")
            block = _page_records(reader, state, kind, section_id, blocks, ram_block, image, block)
            _footer(reader, state, section_id)
            if kind == _SECTION_END:
                break
        image.flush()
        state_bytes = reader.rest(state)
    finally:
        os.close(fd)
    return SplitResult(ram_block, ram_bytes, image.pages, state_bytes)


def _setup_records(reader: _Reader, state: BinaryIO) -> dict[str, int]:
    """The START section's content: the block list, then EOS. Copied as is; returns {idstr: size}."""
    header = reader.be64()
    if header & _FLAG_MASK != _FLAG_MEM_SIZE:
        raise SnapshotError(f"RAM section starts with flags {header & _FLAG_MASK:#x}, not MEM_SIZE")
    out = [struct.pack(">Q", header)]
    total, blocks = header & ~_FLAG_MASK, {}
    while sum(blocks.values()) < total:
        length = reader.u8()
        idstr = reader.read(length)
        used = reader.be64()
        addr = reader.be64()  # x-ignore-shared's block address: the stream is saved with it on
        blocks[idstr.decode("ascii", "replace")] = used
        out += [bytes([length]), idstr, struct.pack(">QQ", used, addr)]
    eos = reader.be64()
    if eos != _FLAG_EOS:
        raise SnapshotError(f"RAM block list not followed by EOS (got {eos:#x})")
    out.append(struct.pack(">Q", eos))
    state.write(b"".join(out))
    return blocks


def _page_records(reader: _Reader, state: BinaryIO, kind: int, section_id: int, blocks: dict[str, int],
                  ram_block: str, image: _Image, block: str | None) -> str | None:
    """One PART or END section's pages, up to its EOS. Pages of `ram_block` go to the image; the
    others (ROMs: a few hundred KiB) stay in the state, each record re-headed with its block name."""
    kept = [bytes([kind]), struct.pack(">I", section_id)]
    while True:
        header = reader.be64()
        flags, offset = header & _FLAG_MASK, header & ~_FLAG_MASK
        if flags & ~_KNOWN_FLAGS:
            raise SnapshotError(f"RAM record flags {flags:#x} are not supported (compression, XBZRLE, multifd?)")
        if flags == _FLAG_EOS:
            kept.append(struct.pack(">Q", _FLAG_EOS))
            break
        if not flags & _FLAG_CONTINUE:
            block = reader.read(reader.u8()).decode("ascii", "replace")
        if block not in blocks or offset >= blocks[block]:
            raise SnapshotError(f"RAM record for unknown block {block!r} or offset {offset:#x}")
        if flags & _FLAG_ZERO:
            fill = reader.u8()
            data = None if fill == 0 else bytes([fill]) * PAGE_SIZE
        elif flags & _FLAG_PAGE:
            data = reader.read(PAGE_SIZE)
        else:
            raise SnapshotError(f"RAM record with flags {flags:#x} carries no page")
        if block == ram_block:
            image.page(offset, data) if data is not None else image.zero(offset)
            continue
        # A record the state keeps names its block (CONTINUE may refer to a block we dropped).
        name = block.encode()
        kept.append(struct.pack(">Q", offset | (flags & ~_FLAG_CONTINUE)) + bytes([len(name)]) + name)
        kept.append(bytes([fill]) if flags & _FLAG_ZERO else data)
    state.write(b"".join(kept))
    return block


def _footer(reader: _Reader, state: BinaryIO, section_id: int) -> None:
    # Machines of QEMU >= 2.x send a footer after every section; it must name the same section.
    kind = reader.u8()
    if kind != _SECTION_FOOTER or reader.be32() != section_id:
        raise SnapshotError("RAM section footer missing or naming another section")
    state.write(bytes([_SECTION_FOOTER]) + struct.pack(">I", section_id))


class _Receiver:
    """Listens on a Unix socket for QEMU's `migrate unix:PATH` and consumes the stream on a thread.
    `uid`: a jailed QEMU's, which must be able to connect."""

    def __init__(self, socket_path: Path, consume, uid: int | None = None):
        socket_path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        if uid is not None:
            os.chown(socket_path, uid, uid)
        self._listener.listen(1)
        self._listener.settimeout(RECEIVE_TIMEOUT_S)
        self._task = asyncio.ensure_future(asyncio.to_thread(self._run, consume))

    def _run(self, consume):
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            raise SnapshotError(f"QEMU never sent its state: {exc}") from None
        finally:
            self._listener.close()
        conn.settimeout(RECEIVE_TIMEOUT_S)
        try:
            with conn, conn.makefile("rb", buffering=1 << 20) as stream:
                return consume(stream)
        except OSError as exc:
            raise SnapshotError(f"receiving the VM's state failed: {exc}") from None

    async def result(self):
        return await self._task

    def cancel(self) -> None:
        if not self._task.done():
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept
            except OSError:
                pass


def receive_split(socket_path: Path, memory: Path, state: Path, uid: int | None = None) -> _Receiver:
    def consume(stream: BinaryIO) -> SplitResult:
        with open(state, "wb") as out:
            return split_stream(stream, str(memory), out)

    return _Receiver(socket_path, consume, uid)


def receive_file(socket_path: Path, file: Path, uid: int | None = None) -> _Receiver:
    """The whole stream, as it comes, into `file` (a state without RAM: a template's)."""
    def consume(stream: BinaryIO) -> None:
        with open(file, "wb") as out:
            shutil.copyfileobj(stream, out, _RUN_BYTES)

    return _Receiver(socket_path, consume, uid)


async def send_file(socket_path: Path, file: Path) -> None:
    """Streams `file` into QEMU's `migrate-incoming unix:PATH` listener."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, open(file, "rb") as f:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(socket_path))
        await loop.sock_sendfile(sock, f)
