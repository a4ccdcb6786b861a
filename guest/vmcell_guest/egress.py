"""The guest end of the egress port: a TCP listener on 127.0.0.1:3128 whose connections are carried,
one stream each, to the host's proxy over the `org.vmcell.egress` virtio-serial port.

The guest has no NIC: this is its only way out, and only for sessions the host gave network (the
agent starts this on the host's `egress` op; HTTP(S)_PROXY point here then, never otherwise). The
host's proxy decides what each connection may reach. Framing and synchronisation:
egress_wire.py. Threads, like the agent: one reads the port, one accepts, two per stream (socket ->
port within the host's window, host's data -> socket then WINDOW back).
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time

from .egress_wire import (
    EGRESS_PORT_NAME,
    GUEST_PROXY_HOST,
    GUEST_PROXY_PORT,
    MAX_DATA,
    MAX_STREAMS,
    PROXY_URL,
    WINDOW_BYTES,
    EgressDecoder,
    EgressProtocolError,
    Kind,
    encode,
    encode_window,
    guest_marker,
    host_marker,
)

PIP_CONF = "/etc/pip.conf"
_EOF, _CLOSE = object(), object()


def log(message: str) -> None:
    print(f"vmcell-egress: {message}", file=sys.stderr, flush=True)


class _Stream:
    def __init__(self, owner: "Egress", sid: int, sock: socket.socket):
        self.owner, self.sid, self.sock = owner, sid, sock
        self.credit = WINDOW_BYTES  # what we may still send the host
        self.cond = threading.Condition()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # host -> socket: bytes, _EOF, _CLOSE
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._up, name=f"egress-up-{self.sid}", daemon=True).start()
        threading.Thread(target=self._down, name=f"egress-down-{self.sid}", daemon=True).start()

    def add_credit(self, n: int) -> None:
        with self.cond:
            self.credit += n
            self.cond.notify_all()

    def abort(self) -> None:
        """Gone (the host closed it, or a resync dropped it): both threads end, the socket closes."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.inbox.put(_CLOSE)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv
        except OSError:
            pass

    def _up(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.credit <= 0 and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    want = min(self.credit, MAX_DATA)
                data = self.sock.recv(want)
                if not data:
                    self.owner.send(self, Kind.EOF)
                    return
                with self.cond:
                    self.credit -= len(data)
                if not self.owner.send(self, Kind.DATA, data):
                    return
        except OSError:
            if not self.closed:
                self.owner.close_stream(self, tell_host=True)

    def _down(self) -> None:
        try:
            while True:
                item = self.inbox.get()
                if item is _CLOSE:  # after the DATA queued before it: the host's last bytes are written
                    self.sock.shutdown(socket.SHUT_RDWR)  # also wakes _up's recv
                    return
                if item is _EOF:
                    self.sock.shutdown(socket.SHUT_WR)
                    continue
                self.sock.sendall(item)
                self.owner.send(self, Kind.WINDOW, credit=len(item))
        except OSError:
            self.owner.close_stream(self, tell_host=True)
        finally:
            self.sock.close()


class Egress:
    def __init__(self, port_path: str):
        self.fd = os.open(port_path, os.O_RDWR)
        self.lock = threading.Lock()  # the port's writes, the stream table, the decoder
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.decoder: EgressDecoder | None = None  # None: not synced yet, input is dropped
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((GUEST_PROXY_HOST, GUEST_PROXY_PORT))
        self.listener.listen(128)
        threading.Thread(target=self._read_port, name="egress-port", daemon=True).start()
        threading.Thread(target=self._accept, name="egress-accept", daemon=True).start()

    # ---- the host's side of things --------------------------------------------------------------

    def sync(self, nonce: str) -> int:
        """A (new) host connection: every stream is dropped, our marker goes out, and the host's
        input counts from its marker on. Returns how many streams were dropped."""
        with self.lock:
            dropped = list(self.streams.values())
            self.streams.clear()
            self.decoder = EgressDecoder(host_marker(nonce))
            self._write(guest_marker(nonce))
        for stream in dropped:
            stream.abort()
        return len(dropped)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def send(self, stream: _Stream, kind: Kind, data: bytes = b"", credit: int = 0) -> bool:
        """One frame for a stream that is still ours (not dropped by a resync or closed)."""
        frame = encode_window(stream.sid, credit) if kind == Kind.WINDOW else encode(kind, stream.sid, data)
        with self.lock:
            if self.streams.get(stream.sid) is not stream:
                return False
            if kind == Kind.CLOSE:
                del self.streams[stream.sid]
            self._write(frame)
            return True

    def close_stream(self, stream: _Stream, tell_host: bool) -> None:
        if tell_host:
            self.send(stream, Kind.CLOSE)
        with self.lock:
            if self.streams.get(stream.sid) is stream:
                del self.streams[stream.sid]
        stream.abort()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:
                log(f"accept failed: {exc}")
                time.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                if self.decoder is None or len(self.streams) >= MAX_STREAMS:
                    log("refusing a connection: " + ("no host" if self.decoder is None else
                                                      f"{MAX_STREAMS} streams are open"))
                    sock.close()
                    continue
                stream = _Stream(self, self.next_id, sock)
                self.next_id += 1
                self.streams[stream.sid] = stream
                self._write(encode(Kind.OPEN, stream.sid))
            stream.start()

    def _read_port(self) -> None:
        while True:
            data = os.read(self.fd, 1 << 20)
            if not data:
                time.sleep(0.02)  # no host connected: it syncs again when one is
                continue
            with self.lock:
                decoder = self.decoder
                if decoder is None or decoder.failed:
                    continue
                try:
                    frames = decoder.feed(data)
                except EgressProtocolError as exc:
                    log(f"dropping the host's input until its next sync: {exc}")
                    continue
                streams = dict(self.streams)
            for frame in frames:
                stream = streams.get(frame.stream)
                if stream is None:
                    continue  # closed meanwhile, or never ours
                if frame.kind == Kind.DATA:
                    stream.inbox.put(frame.payload)
                elif frame.kind == Kind.WINDOW:
                    stream.add_credit(frame.credit)
                elif frame.kind == Kind.EOF:
                    stream.inbox.put(_EOF)
                elif frame.kind == Kind.CLOSE:
                    with self.lock:
                        if self.streams.get(stream.sid) is stream:
                            del self.streams[stream.sid]
                    with stream.cond:
                        stream.closed = True
                        stream.cond.notify_all()
                    stream.inbox.put(_CLOSE)

_egress: Egress | None = None
_egress_lock = threading.Lock()


def enable(nonce: str, port_path: str | None = None) -> dict:
    """The agent's `egress` op: starts the listener on first use, (re)syncs with the host, and
    points pip at the proxy (the kernel's HTTP(S)_PROXY come from the host with the session env)."""
    global _egress
    with _egress_lock:
        if _egress is None:
            from .agent import find_port

            _egress = Egress(port_path or find_port(EGRESS_PORT_NAME, wait_s=5.0))
            with open(PIP_CONF, "w") as f:
                f.write(f"[global]\nproxy = {PROXY_URL}\n")
        dropped = _egress.sync(nonce)
    return {"listen": f"{GUEST_PROXY_HOST}:{GUEST_PROXY_PORT}", "dropped": dropped}
