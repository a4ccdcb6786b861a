"""The host end of a session's egress port: the guest's TCP connections, demultiplexed into streams
(framing: vmcell_guest/egress_wire.py), each served by the session's proxy (proxy.py).

Everything from the guest is untrusted. Frames are size-capped and shape-checked by the decoder;
here the stream states are: OPEN ids must increase, at most MAX_STREAMS are open (more are closed
at once, logged), DATA must fit the window we granted (so a stream buffers at most WINDOW_BYTES
here, a session at most MAX_STREAMS x WINDOW_BYTES), WINDOW must not grant past WINDOW_BYTES, and
frames for streams that were never opened are errors (ones for streams that just closed are
dropped: both sides may close at once). The first violation closes the session's egress, with a log
line; the session itself lives on, without network until its VM is reconnected. Writes toward the
guest wait for its window and for the socket to drain: nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

from vmcell_guest.egress_wire import (
    MAX_DATA,
    MAX_STREAMS,
    PROXY_URL,
    WINDOW_BYTES,
    EgressDecoder,
    EgressFrame,
    EgressProtocolError,
    Kind,
    encode,
    encode_window,
    guest_marker,
    host_marker,
)

from .policy import NetworkPolicy
from .proxy import HEAD_LIMIT, EgressProxy

log = logging.getLogger("vmcell.network")

_READ_CHUNK = 256 * 1024
# What the kernel's environment gets in a session with network (and nothing of it without).
PROXY_ENV = {name: PROXY_URL for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}


class MuxStream:
    """One guest connection, as the proxy sees it (read/readuntil/readexactly/send/send_eof/close)."""

    def __init__(self, endpoint: "EgressEndpoint", sid: int):
        self._endpoint, self.sid = endpoint, sid
        self._buf = bytearray()
        self._eof = False  # the guest sent EOF (or the stream is gone)
        self.closed = False
        self._readable = asyncio.Event()
        self.recv_credit = WINDOW_BYTES  # what the guest may still send before we grant more
        self._consumed = 0
        self.send_credit = WINDOW_BYTES  # what we may still send the guest
        self._writable = asyncio.Event()
        self.task: asyncio.Task | None = None

    # ---- from the endpoint ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.recv_credit -= len(data)
        self._buf += data
        self._readable.set()

    def feed_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def add_credit(self, n: int) -> None:
        self.send_credit += n
        self._writable.set()

    def gone(self) -> None:
        """Closed by the guest, or the egress went away: readers see EOF, writers an error."""
        self.closed = self._eof = True
        self._readable.set()
        self._writable.set()

    # ---- the proxy's side -------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._consumed += len(data)
        # Grant more once a quarter of the window was consumed: fewer frames than one per read.
        if self._consumed >= WINDOW_BYTES // 4 and not self.closed:
            self._endpoint.write(encode_window(self.sid, self._consumed))
            self.recv_credit += self._consumed
            self._consumed = 0
        return data

    async def _wait_readable(self) -> None:
        self._readable.clear()
        await self._readable.wait()

    async def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            await self._wait_readable()
        return self._take(len(self._buf) if n < 0 else n)

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buf), n)
            await self._wait_readable()
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        start = 0
        while True:
            at = self._buf.find(separator, start)
            if at >= 0:
                if at + len(separator) > HEAD_LIMIT:
                    raise asyncio.LimitOverrunError("separator found past the limit", at)
                return self._take(at + len(separator))
            if len(self._buf) > HEAD_LIMIT:
                raise asyncio.LimitOverrunError("no separator within the limit", len(self._buf))
            if self._eof:
                raise asyncio.IncompleteReadError(bytes(self._buf), None)
            start = max(0, len(self._buf) - len(separator) + 1)
            await self._wait_readable()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self.send_credit <= 0 and not self.closed:
                self._writable.clear()
                await self._writable.wait()
            if self.closed:
                raise ConnectionResetError("the guest closed the stream")
            n = min(len(view), self.send_credit, MAX_DATA)
            self._endpoint.write(encode(Kind.DATA, self.sid, bytes(view[:n])))
            self.send_credit -= n
            view = view[n:]
            await self._endpoint.drain()

    async def send_eof(self) -> None:
        if not self.closed:
            self._endpoint.write(encode(Kind.EOF, self.sid))

    async def close(self) -> None:
        if not self.closed:
            self.gone()
            self._endpoint.write(encode(Kind.CLOSE, self.sid))
        self._endpoint.forget(self)


class EgressEndpoint:
    """A session's egress: its socket, its streams, its proxy. connect() (re)attaches to a VM."""

    def __init__(self, session_id: str, policy: NetworkPolicy, on_refuse=None):
        self.session_id, self.policy = session_id, policy
        self.proxy = EgressProxy(policy, session_id, on_refuse=on_refuse)
        self.streams: dict[int, MuxStream] = {}
        self.last_id = 0
        self.failure: str | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._closed = False

    @property
    def active(self) -> bool:
        return self._writer is not None and not self._closed

    async def connect(self, path: Path, agent, timeout: float = 10.0) -> None:
        """Connects to the VM's egress socket and syncs both directions (egress_wire.py): the
        `egress` op makes the guest drop its streams and send its marker; ours follows its answer."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
        self._writer = writer
        nonce = secrets.token_hex(16)
        decoder = EgressDecoder(guest_marker(nonce))
        self._reader_task = asyncio.ensure_future(self._read(reader, decoder))
        try:
            await agent.egress(nonce)
            writer.write(host_marker(nonce))
            await asyncio.wait_for(writer.drain(), timeout)
        except BaseException:
            await self.close()
            raise

    def write(self, frame: bytes) -> None:
        if self.active:
            self._writer.write(frame)

    async def drain(self) -> None:
        if not self.active:
            raise ConnectionResetError("the session's egress is closed")
        await self._writer.drain()

    def forget(self, stream: MuxStream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]

    async def _read(self, reader: asyncio.StreamReader, decoder: EgressDecoder) -> None:
        reason = "the VM closed its egress port"
        try:
            while True:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    break
                for frame in decoder.feed(data):
                    self._dispatch(frame)
        except EgressProtocolError as exc:
            reason = f"the guest broke the egress protocol: {exc}"
            self.failure = reason
            log.warning("session %s: egress closed: %s", self.session_id, reason)
        except (ConnectionError, OSError) as exc:
            reason = f"the egress socket failed: {exc}"
        finally:
            self._shut(reason)

    def _dispatch(self, frame: EgressFrame) -> None:
        sid = frame.stream
        if frame.kind == Kind.OPEN:
            if sid <= self.last_id:
                raise EgressProtocolError(f"OPEN of stream {sid}, not above the last one ({self.last_id})")
            self.last_id = sid
            if len(self.streams) >= MAX_STREAMS:
                log.warning("session %s: egress refused a connection: %d streams are open", self.session_id,
                            MAX_STREAMS)
                self.write(encode(Kind.CLOSE, sid))
                return
            stream = self.streams[sid] = MuxStream(self, sid)
            stream.task = asyncio.ensure_future(self._serve(stream))
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_id:
                raise EgressProtocolError(f"{frame.kind.name} for stream {sid}, which was never opened")
            return  # closed here meanwhile
        if frame.kind == Kind.DATA:
            if len(frame.payload) > stream.recv_credit or stream._eof:
                raise EgressProtocolError(f"stream {sid} sent DATA past its window or after its EOF")
            stream.feed(frame.payload)
        elif frame.kind == Kind.EOF:
            stream.feed_eof()
        elif frame.kind == Kind.WINDOW:
            if stream.send_credit + frame.credit > WINDOW_BYTES:
                raise EgressProtocolError(f"stream {sid} granted a window past {WINDOW_BYTES} bytes")
            stream.add_credit(frame.credit)
        elif frame.kind == Kind.CLOSE:
            stream.gone()
            self.forget(stream)
            if stream.task is not None:
                stream.task.cancel()  # the guest's side is gone: so is the upstream connection

    async def _serve(self, stream: MuxStream) -> None:
        try:
            await self.proxy.serve(stream)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("session %s: egress stream %d failed", self.session_id, stream.sid)
        finally:
            await stream.close()

    def _shut(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in list(self.streams.values()):
            stream.gone()
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        if self._writer is not None:
            self._writer.close()
        log.debug("session %s: egress closed (%s)", self.session_id, reason)

    async def close(self) -> None:
        self._shut("closed by the server")
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
