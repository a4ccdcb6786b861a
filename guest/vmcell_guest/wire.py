"""The guest link's wire format, shared by the guest agent and the host (stdlib only).

One frame:  length:u32 BE | channel:u8 | body[length - 1]
  - length counts the channel byte and the body; 1 <= length <= MAX_FRAME_BYTES.
  - CONTROL bodies are one UTF-8 JSON object (agent requests, replies and events).
  - Jupyter channel bodies are multipart: nparts:u16 BE | nparts x len:u32 BE | the parts back to back,
    with 1 <= nparts <= MAX_PARTS and the lengths adding up to exactly the rest of the body.

docs/link-protocol.md describes the protocol on top of this. The decoder is written for untrusted
input: it never allocates more than the declared (capped) frame, and every malformed input raises
ProtocolError, nothing else.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_PARTS = 64
# Guest-side name of the virtio-serial port that carries the link (also the QEMU `name=`).
AGENT_PORT_NAME = "org.vmcell.agent"

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


def encode_frame(channel: Channel, body: bytes) -> bytes:
    length = 1 + len(body)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte cap")
    return _HEADER.pack(length, int(channel)) + body


def encode_control(message: dict) -> bytes:
    return encode_frame(Channel.CONTROL, json.dumps(message, separators=(",", ":")).encode())


def encode_multipart(channel: Channel, parts: list[bytes]) -> bytes:
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ProtocolError(f"a message needs 1..{MAX_PARTS} parts, got {len(parts)}")
    head = _U16.pack(len(parts)) + b"".join(_U32.pack(len(p)) for p in parts)
    return encode_frame(channel, head + b"".join(parts))


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


class FrameDecoder:
    """Incremental decoder: feed() bytes as they arrive, get the complete frames back."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES):
        self._max = max_frame_bytes
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            length, channel = _HEADER.unpack_from(self._buf, 0)
            if not 1 <= length <= self._max:
                raise ProtocolError(f"frame length {length} outside 1..{self._max}")
            try:
                chan = Channel(channel)
            except ValueError:
                raise ProtocolError(f"unknown channel {channel}") from None
            end = 4 + length
            if len(self._buf) < end:
                break
            frames.append(Frame(chan, bytes(self._buf[_HEADER.size : end])))
            del self._buf[:end]
        return frames
