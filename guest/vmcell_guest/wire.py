"""The guest link's wire format, shared by the guest agent and the host (stdlib only).

One frame:  length:u32 BE | channel:u8 | body[length - 1]
  - length counts the channel byte and the body; 1 <= length <= MAX_FRAME_BYTES.
  - the channel byte is slot * SLOT_STRIDE + channel: slot 0 is the default kernel (bytes 0-4, as in
    protocol 2), slots 1..MAX_CONTEXT_SLOT are code contexts (each its own kernel, Jupyter channels
    only: CONTROL is slot 0's). Anything else is a ProtocolError.
  - CONTROL bodies are one UTF-8 JSON object (agent requests, replies and events).
  - Jupyter channel bodies are multipart: nparts:u16 BE | nparts x len:u32 BE | the parts back to back,
    with 1 <= nparts <= MAX_PARTS and the lengths adding up to exactly the rest of the body.

Resynchronisation (docs/link-protocol.md): a new host connection may meet streams cut mid-frame in
either direction (a snapshot taken while a frame was half written, a host that died mid-frame). The
host starts every connection with HOST_RESYNC_MAGIC, after which the guest's decoder starts afresh;
the guest answers the host's hello with GUEST_SYNC_MAGIC + the hello's nonce, before which the host
ignores everything.

docs/link-protocol.md describes the protocol on top of this. The decoder is written for untrusted
input: it never allocates more than the declared (capped) frame, and every malformed input raises
ProtocolError, nothing else (in resync mode, the guest's, it is counted and skipped instead).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 3  # 3: code contexts (slots in the channel byte; `context` in kernel ops and events)
MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_PARTS = 64
# Code contexts: the channel byte is slot * SLOT_STRIDE + channel; slot 0 is the default kernel.
SLOT_STRIDE = 8
MAX_CONTEXT_SLOT = 8  # slots 1..8; the host's per-session limit (config.MAX_CONTEXTS) is at most this
# Guest-side name of the virtio-serial port that carries the link (also the QEMU `name=`).
AGENT_PORT_NAME = "org.vmcell.agent"

# Both magics hold 0xff/0xfe/0xfd bytes, which never occur in UTF-8 (so never in a JSON body, nor in a
# Jupyter message's header, parent, metadata or content part), and start with 0xff, which can never
# begin a frame header (a length <= MAX_FRAME_BYTES begins with a byte <= 0x02). 0xff occurs nowhere
# else in them: no proper prefix is also a suffix, so stale bytes that end like the start of a magic
# cannot combine with the real one into an earlier, false match.
HOST_RESYNC_MAGIC = b"\xff\xfevmcell:resync\xfe"  # host -> guest, 16 bytes: decode afresh after it
GUEST_SYNC_MAGIC = b"\xff\xfdvmcell:synced\xfd"  # guest -> host, 16 bytes: the host's nonce follows
SYNC_NONCE_HEX = 32  # hello's `sync` nonce: 32 lowercase hex digits (16 random bytes from the host)

_HEADER = struct.Struct(">IB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or message."""


class Channel(enum.IntEnum):
    CONTROL = 0  # agent control requests/replies/events (JSON)
    SHELL = 1  # Jupyter shell (multipart)
    IOPUB = 2  # Jupyter iopub (multipart)
    STDIN = 3  # Jupyter stdin (multipart)
    KCONTROL = 4  # Jupyter control (multipart)


@dataclass(frozen=True, slots=True)
class Frame:
    channel: Channel
    body: bytes
    slot: int = 0  # the code context (0: the default kernel)


def channel_byte(channel: Channel, slot: int = 0) -> int:
    """The frame's channel byte for a channel of a slot; ProtocolError for a slot that cannot be."""
    if not isinstance(slot, int) or not 0 <= slot <= MAX_CONTEXT_SLOT:
        raise ProtocolError(f"slot {slot!r} outside 0..{MAX_CONTEXT_SLOT}")
    if slot and channel == Channel.CONTROL:
        raise ProtocolError("control frames belong to slot 0")
    return slot * SLOT_STRIDE + int(channel)


def split_channel_byte(value: int) -> tuple[int, Channel]:
    """(slot, channel) of a frame's channel byte, validated (the peer may be hostile)."""
    slot, number = divmod(value, SLOT_STRIDE)
    try:
        channel = Channel(number)
    except ValueError:
        raise ProtocolError(f"unknown channel {value}") from None
    if slot > MAX_CONTEXT_SLOT:
        raise ProtocolError(f"unknown channel {value} (slot {slot} outside 0..{MAX_CONTEXT_SLOT})")
    if slot and channel == Channel.CONTROL:
        raise ProtocolError(f"unknown channel {value} (control frames belong to slot 0)")
    return slot, channel


def encode_frame(channel: Channel, body: bytes, slot: int = 0) -> bytes:
    length = 1 + len(body)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte cap")
    return _HEADER.pack(length, channel_byte(channel, slot)) + body


def encode_control(message: dict) -> bytes:
    return encode_frame(Channel.CONTROL, json.dumps(message, separators=(",", ":")).encode())


def encode_multipart(channel: Channel, parts: list[bytes], slot: int = 0) -> bytes:
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ProtocolError(f"a message needs 1..{MAX_PARTS} parts, got {len(parts)}")
    head = _U16.pack(len(parts)) + b"".join(_U32.pack(len(p)) for p in parts)
    return encode_frame(channel, head + b"".join(parts), slot)


def decode_control(body: bytes) -> dict:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"control frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"control frame must be a JSON object, got {type(message).__name__}")
    return message


def decode_multipart(body: bytes) -> list[bytes]:
    if len(body) < _U16.size:
        raise ProtocolError("multipart body shorter than its part count")
    (nparts,) = _U16.unpack_from(body, 0)
    if not 1 <= nparts <= MAX_PARTS:
        raise ProtocolError(f"multipart part count {nparts} outside 1..{MAX_PARTS}")
    offset = _U16.size + nparts * _U32.size
    if len(body) < offset:
        raise ProtocolError("multipart body shorter than its length table")
    lengths = [_U32.unpack_from(body, _U16.size + i * _U32.size)[0] for i in range(nparts)]
    if offset + sum(lengths) != len(body):
        raise ProtocolError("multipart part lengths do not add up to the body size")
    parts = []
    for n in lengths:
        parts.append(body[offset : offset + n])
        offset += n
    return parts


def is_sync_nonce(value) -> bool:
    return (isinstance(value, str) and len(value) == SYNC_NONCE_HEX
            and all(c in "0123456789abcdef" for c in value))


def sync_marker(nonce: str) -> bytes:
    """What the guest writes, between two frames, right before its answer to a hello with this nonce."""
    if not is_sync_nonce(nonce):
        raise ProtocolError(f"a sync nonce is {SYNC_NONCE_HEX} lowercase hex digits")
    return GUEST_SYNC_MAGIC + nonce.encode("ascii")


class FrameDecoder:
    """Incremental decoder: feed() bytes as they arrive, get the complete frames back.

    `between`: a marker that may stand between two frames and is dropped there (the host's decoder
    after the sync: a resent hello is answered with the marker again). Anything else that does not
    frame raises ProtocolError.

    `resync` (the guest's decoder of the host's stream): wherever this magic shows up in the input,
    also split across reads, everything before it is dropped and decoding starts afresh. Framing
    errors then do not raise: the decoder counts them (`errors`, `last_error`) and drops what comes
    until the next magic, since the host starts every connection and every hello resend with one.
    Frames are decoded as soon as they are complete, so a magic split across reads whose first part
    completes a frame a stale header promised is not seen; the hello resend's magic is.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, *, between: bytes = b"", resync: bytes = b""):
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._between = between
        self._resync = resync
        self._lost = False  # resync mode, after a framing error: nothing is decoded until the magic
        self.resyncs = 0  # magics seen
        self.errors = 0  # framing errors survived (resync mode)
        self.last_error: str | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def lost(self) -> bool:
        return self._lost

    def reset(self) -> None:
        """Forget any partial frame (the peer disconnected: what it half sent is not coming)."""
        self._buf.clear()
        self._lost = False

    def feed(self, data: bytes) -> list[Frame]:
        if not self._resync:
            self._buf += data
            frames: list[Frame] = []
            self._decode(frames)
            return frames
        magic = self._resync
        # A magic may have begun in the last len(magic) - 1 bytes already buffered: search from there,
        # so the scan costs the new bytes, not the whole (up to 32 MiB) partial frame, per read.
        start = max(0, len(self._buf) - len(magic) + 1)
        self._buf += data
        at = self._buf.rfind(magic, start)
        if at >= 0:
            del self._buf[: at + len(magic)]
            self._lost = False
            self.resyncs += 1
        if self._lost:
            self._keep_magic_start()
            return []
        frames = []
        try:
            self._decode(frames)
        except ProtocolError as exc:
            self._lost = True
            self.errors += 1
            self.last_error = str(exc)
            self._keep_magic_start()
        return frames

    def _keep_magic_start(self) -> None:
        del self._buf[: max(0, len(self._buf) - len(self._resync) + 1)]

    def _decode(self, frames: list[Frame]) -> None:
        between = self._between
        while self._buf:
            if between and self._buf[0] == between[0]:  # no frame header starts with it (see the magics)
                n = min(len(self._buf), len(between))
                if self._buf[:n] == between[:n]:
                    if n < len(between):
                        return  # the rest of the marker is still on its way
                    del self._buf[:n]
                    continue
            if len(self._buf) < _HEADER.size:
                return
            length, channel = _HEADER.unpack_from(self._buf, 0)
            if not 1 <= length <= self._max:
                raise ProtocolError(f"frame length {length} outside 1..{self._max}")
            slot, chan = split_channel_byte(channel)
            end = 4 + length
            if len(self._buf) < end:
                return
            frames.append(Frame(chan, bytes(self._buf[_HEADER.size : end]), slot))
            del self._buf[:end]
