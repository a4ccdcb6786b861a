"""The host end of the guest link: frames over the VM's Unix socket, control requests and replies.

Everything the guest sends is untrusted: frames are size-capped and validated by the shared
decoder, control replies are checked for shape, and the first violation closes the link for good
with a GuestProtocolError that every pending and future request sees.

Every connection starts unsynchronised (docs/link-protocol.md, "Resynchronisation"): the guest's
output may resume mid-frame (a snapshot or a previous host cut it), so the reader drops everything
until the guest's sync marker carrying this link's nonce, which the agent writes right before its
answer to our hello (AgentClient.handshake). From the marker on, framing is strict again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmcell_guest.ops import ErrorKind
from vmcell_guest.wire import (
    HOST_RESYNC_MAGIC,
    MAX_FRAME_BYTES,
    SYNC_NONCE_HEX,
    Channel,
    Frame,
    FrameDecoder,
    ProtocolError,
    decode_control,
    encode_control,
    sync_marker,
)

from ..errors import GuestBadRequest, GuestOperationError, GuestProtocolError, GuestTimeout, LinkClosed

log = logging.getLogger("vmcell.link")

DEFAULT_REQUEST_TIMEOUT_S = 30.0
_READ_CHUNK = 256 * 1024
# Before the sync marker: at most this much of the guest's output is dropped (the tail of a cut frame
# is at most 32 MiB; the rest is output the guest queued for the previous host), then the guest is
# taken to be talking nonsense rather than left to stream at us for ever.
MAX_SYNC_DISCARD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ControlReply:
    id: int
    ok: bool
    payload: dict  # the result, or the error {type, message}


@dataclass(frozen=True)
class ControlEvent:
    name: str
    fields: dict


def parse_control(body: bytes) -> ControlReply | ControlEvent:
    """Validates one control message from the guest, or raises ProtocolError."""
    message = decode_control(body)
    if "event" in message:
        if not isinstance(message["event"], str):
            raise ProtocolError("control event name must be a string")
        return ControlEvent(message["event"], message)
    request_id, ok = message.get("id"), message.get("ok")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not isinstance(ok, bool):
        raise ProtocolError("control reply lacks an integer id or a boolean ok")
    payload = message.get("result" if ok else "error")
    if not isinstance(payload, dict):
        raise ProtocolError("control reply lacks a result/error object")
    if not ok and not (isinstance(payload.get("type"), str) and isinstance(payload.get("message"), str)):
        raise ProtocolError("control error reply lacks type/message strings")
    return ControlReply(request_id, ok, payload)


class SyncingDecoder:
    """The host's decoder of one connection's guest stream: drops bytes until the guest's sync marker
    (GUEST_SYNC_MAGIC + `nonce`), then decodes strictly. Frames before the marker are the previous
    connection's (or the tail of one cut in half) and are never parsed; a marker with another nonce
    is one of them. After the sync the marker may only recur between frames (a resent hello is
    answered with it again); anything else that does not frame is a ProtocolError, as is finding no
    marker within `max_discard` bytes."""

    def __init__(self, nonce: str, max_discard: int = MAX_SYNC_DISCARD_BYTES, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.marker = sync_marker(nonce)
        self._max_discard = max_discard
        self._max_frame = max_frame_bytes
        self._pending = bytearray()  # while syncing: only what may be the start of a split marker
        self._decoder: FrameDecoder | None = None  # once synced
        self.discarded = 0  # bytes dropped before the marker

    @property
    def synced(self) -> bool:
        return self._decoder is not None

    def feed(self, data: bytes) -> list[Frame]:
        if self._decoder is not None:
            return self._decoder.feed(data)
        self._pending += data
        at = self._pending.find(self.marker)
        if at < 0:
            drop = max(0, len(self._pending) - len(self.marker) + 1)
            del self._pending[:drop]
            self.discarded += drop
            if self.discarded > self._max_discard:
                raise ProtocolError(f"no sync marker within {self.discarded} bytes from the guest")
            return []
        self.discarded += at
        rest = bytes(self._pending[at + len(self.marker) :])
        self._pending = bytearray()
        self._decoder = FrameDecoder(self._max_frame, between=self.marker)
        return self._decoder.feed(rest)


class GuestLink:
    """One logical link to a guest agent. Its connection may be swapped (`detach`, `reattach`) when
    the VM behind it is saved and restored or adopted by a restarted server; consumers (router,
    agent, engine) keep the same link object throughout."""

    def __init__(self, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter | None,
                 name: str = "guest"):
        self.name = name
        self._reader, self._writer = reader, writer
        self._attached = asyncio.Event()  # sends wait while no connection is attached
        self._detaching = False
        self._new_connection()
        # Request ids start at a random point: a slow op of the previous connection (a `run`, a
        # kernel_start) may still answer after our sync, and must not match a request of ours.
        self._ids = itertools.count(secrets.randbits(48) + 1)
        self._pending: dict[int, asyncio.Future] = {}
        self._write_lock = asyncio.Lock()
        self.failure: Exception | None = None
        # Frames on the Jupyter channels go to their slot's handler (each MessageRouter installs
        # itself: slot 0 the default kernel's, 1.. a code context's). A slot that never had one is a
        # protocol error; one that had and lost it (a removed context) has its late frames dropped.
        self._slot_handlers: dict[int, Callable[[Frame], None]] = {}
        self._slots_opened: set[int] = set()
        self.dropped_frames = 0  # late frames of removed contexts
        # Unsolicited agent events (kernel_died, dropped): the AgentClient installs itself.
        self.on_event: Callable[[ControlEvent], None] | None = None
        self._close_callbacks: list[Callable[[Exception], None]] = []
        self._reader_task: asyncio.Task | None = None
        if reader is not None:
            self._start_reading()

    @property
    def on_channel_frame(self) -> Callable[[Frame], None] | None:
        """The default kernel's (slot 0) handler."""
        return self._slot_handlers.get(0)

    @on_channel_frame.setter
    def on_channel_frame(self, handler: Callable[[Frame], None] | None) -> None:
        self.set_slot_handler(0, handler)

    def set_slot_handler(self, slot: int, handler: Callable[[Frame], None] | None) -> None:
        """Installs (None: removes) the handler of a slot's Jupyter frames."""
        if handler is None:
            self._slot_handlers.pop(slot, None)
        else:
            self._slot_handlers[slot] = handler
            self._slots_opened.add(slot)

    def _new_connection(self) -> None:
        # Each connection's nonce: hello carries it, the guest's sync marker echoes it.
        self.sync_nonce = secrets.token_hex(SYNC_NONCE_HEX // 2)
        self._decoder = SyncingDecoder(self.sync_nonce, MAX_SYNC_DISCARD_BYTES)

    def _start_reading(self) -> None:
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"link-reader-{self.name}")
        self._attached.set()

    @staticmethod
    async def _open(path: Path, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await asyncio.open_unix_connection(str(path), limit=_READ_CHUNK)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise LinkClosed(f"cannot connect to the guest link at {path}") from None
                await asyncio.sleep(0.005)

    @classmethod
    async def connect(cls, path: Path, name: str = "guest", timeout: float = 10.0) -> "GuestLink":
        return cls(*await cls._open(path, timeout), name)

    @classmethod
    def unattached(cls, name: str = "guest") -> "GuestLink":
        """A link whose VM is not running yet (a saved session): `reattach` connects it."""
        return cls(None, None, name)

    @property
    def attached(self) -> bool:
        return self._attached.is_set() and self.failure is None

    async def detach(self) -> None:
        """Lets go of the connection without ending the link: the reader stops quietly, requests in
        flight fail with LinkClosed, and later sends wait until `reattach`."""
        if self.failure is not None or not self._attached.is_set():
            return
        self._attached.clear()
        self._detaching = True
        try:
            if self._reader_task is not None:
                self._reader_task.cancel()
                await asyncio.gather(self._reader_task, return_exceptions=True)
            self._writer.close()
        finally:
            self._detaching = False
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(LinkClosed(f"{self.name}: the link was detached from its VM"))
        self._pending.clear()

    async def reattach(self, path: Path, timeout: float = 10.0) -> None:
        """Connects the link to a (restored or adopted) VM's socket; the caller then says hello."""
        if self.failure is not None:
            raise self.failure
        self._reader, self._writer = await self._open(path, timeout)
        self._new_connection()  # unsynchronised again: the handshake's hello resyncs (AgentClient)
        self._start_reading()

    def add_close_callback(self, callback: Callable[[Exception], None]) -> None:
        """Called once, with the failure, when the link closes for any reason."""
        self._close_callbacks.append(callback)

    @property
    def closed(self) -> bool:
        return self.failure is not None

    @property
    def synced(self) -> bool:
        """The guest's sync marker for this connection arrived: its frames are decoded from there on."""
        return self._decoder.synced

    @property
    def sync_discarded(self) -> int:
        """Bytes of the guest's output dropped before the sync marker (left over from before us)."""
        return self._decoder.discarded

    async def _read_loop(self) -> None:
        try:
            while data := await self._reader.read(_READ_CHUNK):
                was_synced = self._decoder.synced
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
                if not was_synced and self._decoder.synced and self._decoder.discarded:
                    log.info("%s: synced after dropping %d bytes the guest had sent before this connection",
                             self.name, self._decoder.discarded)
            self._fail(LinkClosed(f"{self.name}: the guest link closed"))
        except ProtocolError as exc:
            self._fail(GuestProtocolError(f"{self.name}: invalid data from the guest, link closed: {exc}"))
        except (ConnectionError, OSError) as exc:
            self._fail(LinkClosed(f"{self.name}: the guest link failed: {exc}"))
        except asyncio.CancelledError:
            if not self._detaching:
                self._fail(LinkClosed(f"{self.name}: the guest link was closed"))
        except Exception as exc:  # a bug of ours: still never a reader that dies while the link looks up
            log.exception("%s: the link reader failed", self.name)
            self._fail(LinkClosed(f"{self.name}: the link reader failed: {exc!r}"))

    def _dispatch(self, frame: Frame) -> None:
        if frame.channel != Channel.CONTROL:
            handler = self._slot_handlers.get(frame.slot)
            if handler is None:
                if frame.slot in self._slots_opened:
                    self.dropped_frames += 1  # a removed context's last words
                    return
                where = f" of context slot {frame.slot}, which was never opened" if frame.slot else ""
                raise ProtocolError(f"unexpected frame on channel {frame.channel.name}{where}")
            self._deliver(handler, frame)
            return
        message = parse_control(frame.body)
        if isinstance(message, ControlEvent):
            if self.on_event is not None:
                self._deliver(self.on_event, message)
            return
        fut = self._pending.pop(message.id, None)
        if fut is None:
            return  # a reply to a request we gave up on (e.g. an earlier hello of a resend loop)
        if not fut.done():
            fut.set_result((message.ok, message.payload))

    def _deliver(self, handler: Callable, item) -> None:
        """The reader must outlive its consumers' bugs: only the guest's ProtocolError ends the link."""
        try:
            handler(item)
        except ProtocolError:
            raise
        except Exception:
            log.exception("%s: a consumer of the link failed on %r (the link stays up)", self.name, item)

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
            if isinstance(exc, GuestProtocolError):
                log.error("%s", exc)
            for callback in self._close_callbacks:
                try:
                    callback(exc)
                except Exception:
                    log.exception("%s: a close callback failed", self.name)
        if self._writer is not None:
            self._writer.close()
        self._attached.set()  # senders waiting for a connection see the failure
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self.failure)
        self._pending.clear()

    async def send_frame(self, data: bytes) -> None:
        # The guest restarts its decoder wherever the magic shows up, so a frame holding it (only a
        # client's binary buffer could) would cut the stream in two: refused, the link stays sound.
        if HOST_RESYNC_MAGIC in data:
            raise GuestBadRequest("send", ErrorKind.BadRequest,
                                  "the message contains the link's resync marker, which no message may carry")
        await self._write(data)

    async def _write(self, data: bytes) -> None:
        if self.failure:
            raise self.failure
        await self._attached.wait()
        if self.failure:
            raise self.failure
        async with self._write_lock:
            self._writer.write(data)
            await self._writer.drain()

    async def request(self, op: str, args: dict | None = None, timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                      resync: bool = False) -> dict:
        """One control request. `resync`: the resync magic goes first, in the same write (the start
        of a connection: the guest drops whatever partial frame it holds and decodes from here)."""
        if self.failure:
            raise self.failure
        request_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            frame = encode_control({"id": request_id, "op": op, "args": args or {}})
            if resync:
                await self._write(HOST_RESYNC_MAGIC + frame)
            else:
                await self.send_frame(frame)
            ok, payload = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise GuestTimeout(f"{self.name}: no answer to {op!r} within {timeout:g}s") from None
        finally:
            self._pending.pop(request_id, None)
        if not ok:
            raise GuestOperationError(op, payload["type"], payload["message"])
        return payload

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._fail(LinkClosed(f"{self.name}: the guest link was closed"))
