"""Kernel websocket frame formats, as Jupyter clients speak them.

legacy (no subprotocol): a text frame is one JSON message with a "channel" key; a binary frame,
  for messages with buffers, is  nbufs:u32 BE | nbufs x offset:u32 BE | JSON | buffers...
  (nbufs counts the JSON part; offsets are from the start of the frame).
v1 (`v1.kernel.websocket.jupyter.org`): binary only,
  n:u64 LE | n x offset:u64 LE | channel | header | parent_header | metadata | content | buffers...
Decoders validate everything: a client's frame is input, and bad input is a clear error.
"""

from __future__ import annotations

import struct

import orjson

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
CLIENT_CHANNELS = ("shell", "control", "stdin")


class FrameError(ValueError):
    pass


def _json_part(value, name: str) -> bytes:
    if not isinstance(value, dict):
        raise FrameError(f"`{name}` must be an object")
    return orjson.dumps(value)


def decode_legacy_text(text: str | bytes) -> tuple[str, list[bytes]]:
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"message is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise FrameError("message must be a JSON object")
    return _legacy_parts(msg, [])


def decode_legacy_binary(frame: bytes) -> tuple[str, list[bytes]]:
    if len(frame) < 8:
        raise FrameError("binary frame too short")
    (nbufs,) = struct.unpack_from("!I", frame, 0)
    if not 1 <= nbufs <= 64 or len(frame) < 4 * (nbufs + 1):
        raise FrameError("binary frame has a bad buffer table")
    offsets = list(struct.unpack_from("!" + "I" * nbufs, frame, 4)) + [len(frame)]
    if offsets[0] != 4 * (nbufs + 1) or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise FrameError("binary frame offsets are out of order")
    parts = [frame[a:b] for a, b in zip(offsets, offsets[1:])]
    channel, msg_parts = decode_legacy_text(parts[0])
    return channel, msg_parts + parts[1:]


def _legacy_parts(msg: dict, buffers: list[bytes]) -> tuple[str, list[bytes]]:
    # No channel means shell: jupyter_server's reference handler assumes so, and its own gateway
    # client (used by nbclient through a gateway) sends none.
    channel = msg.get("channel") or "shell"
    if channel not in CLIENT_CHANNELS:
        raise FrameError(f"channel must be one of {', '.join(CLIENT_CHANNELS)}, got {channel!r}")
    header = msg.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_id"), str) \
            or not isinstance(header.get("msg_type"), str):
        raise FrameError("header with msg_id and msg_type is required")
    parts = [_json_part(header, "header"), _json_part(msg.get("parent_header") or {}, "parent_header"),
             _json_part(msg.get("metadata") or {}, "metadata"), _json_part(msg.get("content") or {}, "content")]
    return channel, parts + buffers


def decode_v1(frame: bytes) -> tuple[str, list[bytes]]:
    if len(frame) < 8:
        raise FrameError("v1 frame too short")
    (n,) = struct.unpack_from("<Q", frame, 0)
    if not 6 <= n <= 70 or len(frame) < 8 * (n + 1):
        raise FrameError("v1 frame has a bad offset table")
    offsets = list(struct.unpack_from("<" + "Q" * n, frame, 8))
    if offsets[0] != 8 * (n + 1) or offsets[-1] > len(frame) or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise FrameError("v1 frame offsets are out of order")
    offsets[-1] = len(frame)
    pieces = [frame[a:b] for a, b in zip(offsets, offsets[1:])]
    channel = pieces[0].decode(errors="replace")
    if channel not in CLIENT_CHANNELS:
        raise FrameError(f"channel must be one of {', '.join(CLIENT_CHANNELS)}, got {channel!r}")
    for name, raw in zip(("header", "parent_header", "metadata", "content"), pieces[1:5]):
        try:
            if not isinstance(orjson.loads(raw), dict):
                raise FrameError(f"`{name}` must be an object")
        except orjson.JSONDecodeError:
            raise FrameError(f"`{name}` is not JSON") from None
    return channel, pieces[1:]


def encode_v1(channel: str, parts: list[bytes]) -> bytes:
    """parts: header, parent_header, metadata, content, buffers... (JSON bytes as the kernel sent them)."""
    pieces = [channel.encode(), *parts]
    offsets = [8 * (len(pieces) + 2)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack("<" + "Q" * (len(offsets) + 1), len(offsets), *offsets) + b"".join(pieces)


def encode_legacy(channel: str, msg: dict, buffers: list[bytes]) -> tuple[bytes | str, bool]:
    """(frame, is_binary): text JSON, or the binary layout when the message has buffers."""
    body = {**{k: v for k, v in msg.items() if k != "buffers"}, "channel": channel, "buffers": []}
    data = orjson.dumps(body)
    if not buffers:
        return data.decode(), False
    pieces = [data, *buffers]
    offsets = [4 * (len(pieces) + 1)]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack("!" + "I" * (len(pieces) + 1), len(pieces), *offsets) + b"".join(pieces), True
