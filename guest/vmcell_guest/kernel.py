"""The guest's IPython kernel and the relay between its ZMQ sockets and the link.

The kernel listens on ipc sockets under /run/vmcell. One relay thread owns every ZMQ socket: it
forwards frames the host sent (handed over through an inproc PAIR, since ZMQ sockets must stay on
one thread) and sends every kernel message to the host as a multipart frame on its channel. It
also notices when the kernel process dies and tells the host with a control event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import zmq

from .wire import MAX_FRAME_BYTES, Channel, encode_control, encode_multipart

RUN_DIR = "/run/vmcell"
CONNECTION_FILE = f"{RUN_DIR}/kernel.json"
_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
_RELAY_INBOX = "inproc://vmcell-relay-inbox"


def _address(port_name: str) -> str:
    return f"ipc://{RUN_DIR}/kernel-{_PORTS[port_name]}"


class KernelRelay:
    def __init__(self, send: Callable[[bytes], None]):
        self._send = send  # writes one encoded frame to the link
        self._ctx = zmq.Context()
        self._lock = threading.Lock()  # guards the process and the host-side inbox socket
        self._proc: subprocess.Popen | None = None
        self._inbox_push: zmq.Socket | None = None
        self._generation = 0
        self._relay: threading.Thread | None = None

    # ---- process ---------------------------------------------------------------------------

    def start(self, key: str, env: dict[str, str] | None = None) -> dict:
        with self._lock:
            self._generation += 1  # first: the old relay must not report its kernel's death as news
            self._stop_locked()
            os.makedirs(RUN_DIR, exist_ok=True)
            with open(CONNECTION_FILE, "w") as f:
                json.dump({**_PORTS, "transport": "ipc", "ip": f"{RUN_DIR}/kernel", "key": key,
                           "signature_scheme": "hmac-sha256", "kernel_name": "python3"}, f)
            kernel_env = dict(os.environ, **(env or {}))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ipykernel_launcher", "-f", CONNECTION_FILE,
                 "--ext=vmcell_guest.ipython_ext", "--HistoryManager.enabled=False"],
                cwd="/root", env=kernel_env, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            self._relay = threading.Thread(target=self._relay_loop, args=(self._generation, self._proc),
                                           name="kernel-relay", daemon=True)
            ready = threading.Event()
            self._relay_ready = ready
            self._relay.start()
            ready.wait(10)
            self._inbox_push = self._ctx.socket(zmq.PAIR)
            self._inbox_push.connect(_RELAY_INBOX + str(self._generation))
            return {"pid": self._proc.pid}

    def _stop_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        if self._inbox_push is not None:
            self._inbox_push.close(linger=0)
            self._inbox_push = None
        if self._relay is not None:
            self._relay.join(5)
            self._relay = None

    def interrupt(self) -> dict:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                return {"alive": False}
            os.kill(self._proc.pid, signal.SIGINT)
            return {"alive": True}

    def status(self) -> dict:
        with self._lock:
            if self._proc is None:
                return {"alive": False, "pid": None, "returncode": None}
            return {"alive": self._proc.poll() is None, "pid": self._proc.pid, "returncode": self._proc.returncode}

    # ---- host -> kernel --------------------------------------------------------------------

    def forward(self, channel: Channel, parts: list[bytes]) -> None:
        with self._lock:
            if self._inbox_push is None:
                raise RuntimeError("no kernel is running")
            self._inbox_push.send_multipart([bytes([channel]), *parts])

    # ---- the relay thread ------------------------------------------------------------------

    def _relay_loop(self, generation: int, proc: subprocess.Popen) -> None:
        inbox = self._ctx.socket(zmq.PAIR)
        inbox.bind(_RELAY_INBOX + str(generation))
        sockets = {
            Channel.SHELL: self._ctx.socket(zmq.DEALER),
            Channel.KCONTROL: self._ctx.socket(zmq.DEALER),
            Channel.STDIN: self._ctx.socket(zmq.DEALER),
            Channel.IOPUB: self._ctx.socket(zmq.SUB),
        }
        addresses = {Channel.SHELL: "shell_port", Channel.KCONTROL: "control_port",
                     Channel.STDIN: "stdin_port", Channel.IOPUB: "iopub_port"}
        identity = f"vmcell-{generation}".encode()
        for channel, sock in sockets.items():
            sock.setsockopt(zmq.LINGER, 0)
            if channel == Channel.IOPUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                sock.setsockopt(zmq.IDENTITY, identity)  # shell and stdin share one identity, as Jupyter expects
            sock.connect(_address(addresses[channel]))
        channel_of = {sock: channel for channel, sock in sockets.items()}
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        for sock in sockets.values():
            poller.register(sock, zmq.POLLIN)
        self._relay_ready.set()
        try:
            while True:
                events = dict(poller.poll(200))
                if inbox in events:
                    message = inbox.recv_multipart()
                    target = sockets.get(Channel(message[0][0]))
                    if target is not None:
                        target.send_multipart(message[1:])
                for sock, channel in channel_of.items():
                    if sock in events:
                        parts = sock.recv_multipart()
                        size = sum(len(p) for p in parts)
                        if size + 16 + 4 * len(parts) > MAX_FRAME_BYTES:
                            # Too big for one frame: tell the host what was dropped instead.
                            self._send(encode_control({"event": "dropped", "channel": channel.name, "bytes": size}))
                        else:
                            self._send(encode_multipart(channel, parts))
                if proc.poll() is not None:
                    if generation == self._generation:
                        self._send(encode_control({"event": "kernel_died", "returncode": proc.returncode}))
                    return
        finally:
            for sock in (inbox, *sockets.values()):
                sock.close(linger=0)
