"""The egress port's wire format, shared by the guest's egress module and the host (stdlib only).

A second virtio-serial port (`org.vmcell.egress`, `run/<id>/egress.sock` on the host) carries the
guest's outgoing TCP connections to the host's proxy, multiplexed as streams:

  frame:  length:u32 BE | kind:u8 | stream:u32 BE | payload[length - 5]
          5 <= length <= MAX_FRAME_BYTES (so a frame header always begins with a 0x00 byte)

  OPEN    guest -> host  empty payload; stream ids increase strictly (1, 2, ...) per connection
  DATA    both ways      1..MAX_DATA bytes, within the receiver's window (see WINDOW)
  EOF     both ways      empty: the sender will send no more DATA on this stream (half close)
  CLOSE   both ways      empty: the stream is gone; no more frames for it either way
  WINDOW  both ways      u32 credit >= 1: the receiver consumed that many bytes of DATA; the sender
                         may send that much more. Each side starts every stream with WINDOW_BYTES.

Synchronisation (as the agent link's, docs/link-protocol.md): a connection may meet streams cut
mid-frame (a fork's child, a saved session restored, a restarted host). The host sends the
`egress` control op with a fresh nonce over the agent link; the guest then drops every stream,
writes GUEST_SYNC_MAGIC + nonce on this port, and drops its input until HOST_RESYNC_MAGIC + nonce.
The host drops its input until the guest's marker and writes its own marker right after the op's
answer. Markers are looked for only before the sync: DATA after it may hold any bytes.

The decoder is written for untrusted input: every malformed frame raises EgressProtocolError.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .wire import GUEST_SYNC_MAGIC, HOST_RESYNC_MAGIC, SYNC_NONCE_HEX, is_sync_nonce

EGRESS_PORT_NAME = "org.vmcell.egress"
MAX_DATA = 32 * 1024
MAX_FRAME_BYTES = 5 + MAX_DATA
WINDOW_BYTES = 256 * 1024  # per stream and direction: what a receiver may have to buffer
MAX_STREAMS = 64  # open at once per session; more are refused (closed at once)
MAX_SYNC_DISCARD_BYTES = 64 * 1024 * 1024  # stale bytes dropped before the marker, then it is an error
# The guest's proxy endpoint: what HTTP(S)_PROXY point at.
GUEST_PROXY_HOST, GUEST_PROXY_PORT = "127.0.0.1", 3128
PROXY_URL = f"http://{GUEST_PROXY_HOST}:{GUEST_PROXY_PORT}"

_HEADER = struct.Struct(">IBI")
_U32 = struct.Struct(">I")


class EgressProtocolError(Exception):
    """The peer sent bytes that are not a valid egress frame."""


class Kind(enum.IntEnum):
    OPEN = 1
    DATA = 2
    EOF = 3
    CLOSE = 4
    WINDOW = 5


@dataclass(frozen=True, slots=True)
class EgressFrame:
    kind: Kind
    stream: int
    payload: bytes = b""

    @property
    def credit(self) -> int:
        return _U32.unpack(self.payload)[0]


def encode(kind: Kind, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_DATA:
        raise EgressProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_DATA}")
    return _HEADER.pack(5 + len(payload), int(kind), stream) + payload


def encode_window(stream: int, credit: int) -> bytes:
    return encode(Kind.WINDOW, stream, _U32.pack(credit))


def host_marker(nonce: str) -> bytes:
    if not is_sync_nonce(nonce):
        raise EgressProtocolError(f"a sync nonce is {SYNC_NONCE_HEX} lowercase hex digits")
    return HOST_RESYNC_MAGIC + nonce.encode("ascii")


def guest_marker(nonce: str) -> bytes:
    if not is_sync_nonce(nonce):
        raise EgressProtocolError(f"a sync nonce is {SYNC_NONCE_HEX} lowercase hex digits")
    return GUEST_SYNC_MAGIC + nonce.encode("ascii")


def check_frame(frame: EgressFrame) -> None:
    """Shape checks that need no stream state: payload sizes per kind, stream id 0 never used."""
    if frame.stream == 0:
        raise EgressProtocolError("stream id 0 is not used")
    n = len(frame.payload)
    if frame.kind == Kind.DATA:
        if n == 0:
            raise EgressProtocolError("empty DATA frame")
    elif frame.kind == Kind.WINDOW:
        if n != 4:
            raise EgressProtocolError("WINDOW payload must be 4 bytes")
        if not 1 <= frame.credit <= WINDOW_BYTES:
            raise EgressProtocolError(f"WINDOW credit {frame.credit} outside 1..{WINDOW_BYTES}")
    elif n:
        raise EgressProtocolError(f"{frame.kind.name} frame carries a payload")


class EgressDecoder:
    """Incremental decoder of one direction of one connection: feed() bytes, get checked frames.

    `marker`: bytes are dropped until it appears (the peer's sync marker), then decoding is strict;
    None: strict from the first byte. After an error the decoder is unusable (`failed`)."""

    def __init__(self, marker: bytes | None, max_discard: int = MAX_SYNC_DISCARD_BYTES):
        self._marker = marker
        self._max_discard = max_discard
        self._buf = bytearray()
        self.discarded = 0
        self.failed: str | None = None

    @property
    def synced(self) -> bool:
        return self._marker is None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[EgressFrame]:
        if self.failed is not None:
            raise EgressProtocolError(self.failed)
        try:
            return self._feed(data)
        except EgressProtocolError as exc:
            self.failed = str(exc)
            self._buf.clear()
            raise

    def _feed(self, data: bytes) -> list[EgressFrame]:
        marker = self._marker
        if marker is not None:
            start = max(0, len(self._buf) - len(marker) + 1)
            self._buf += data
            at = self._buf.find(marker, start)
            if at < 0:
                drop = max(0, len(self._buf) - len(marker) + 1)
                del self._buf[:drop]
                self.discarded += drop
                if self.discarded > self._max_discard:
                    raise EgressProtocolError(f"no sync marker within {self.discarded} bytes")
                return []
            self.discarded += at
            del self._buf[: at + len(marker)]
            self._marker = None
        else:
            self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            length, kind, stream = _HEADER.unpack_from(self._buf, 0)
            if not 5 <= length <= MAX_FRAME_BYTES:
                raise EgressProtocolError(f"frame length {length} outside 5..{MAX_FRAME_BYTES}")
            try:
                kind = Kind(kind)
            except ValueError:
                raise EgressProtocolError(f"unknown frame kind {kind}") from None
            end = 4 + length
            if len(self._buf) < end:
                break
            frame = EgressFrame(kind, stream, bytes(self._buf[_HEADER.size : end]))
            del self._buf[:end]
            check_frame(frame)
            frames.append(frame)
        return frames
