"""The websocket side of one session's kernel: live gateway connections, and what absent clients missed.

It belongs to the session (not to the web app), so it ends with the session whichever door closes
it: REST delete, gateway delete, the reaper, or a VM that died. Every kernel message goes to every
connection of the kernel, and into a bounded buffer for each client that went away, which it gets
back when it reconnects with the same session_id (as jupyter_server does).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Protocol

from ..kernel.router import KernelMessage, MessageRouter

log = logging.getLogger("vmcell.gateway")

# A client away for longer than this, or missing more than this many messages, starts afresh.
AWAY_BUFFER_S = 120.0
AWAY_BUFFER_MESSAGES = 2000


class Connection(Protocol):
    def send_kernel_message(self, message: KernelMessage) -> None: ...

    def close_for(self, code: int, reason: str) -> None: ...


class ClientChannels:
    def __init__(self, router: MessageRouter):
        self.router = router
        self.live: dict[str, set[Connection]] = {}
        self.away: dict[str, tuple[float, deque]] = {}
        self.closed = False

    @property
    def connections(self) -> int:
        return sum(len(c) for c in self.live.values())

    def _on_message(self, message: KernelMessage) -> None:
        for client_id, connections in list(self.live.items()):
            for connection in list(connections):
                try:
                    connection.send_kernel_message(message)
                except Exception:  # one broken connection is closed; the others, and the kernel, go on
                    log.exception("a websocket failed to take a kernel message; closing it")
                    self.detach(client_id, connection)
                    connection.close_for(1011, "vmcell could not deliver a kernel message")
        now = time.monotonic()
        for client_id, (since, buffer) in list(self.away.items()):
            if now - since > AWAY_BUFFER_S:
                del self.away[client_id]
            else:
                buffer.append(message)
        if not self.live and not self.away:
            self.router.unsubscribe(self._on_message)  # nobody listens: no cost per message

    def attach(self, client_id: str, connection: Connection) -> None:
        self.router.subscribe(self._on_message)
        self.live.setdefault(client_id, set()).add(connection)
        _, missed = self.away.pop(client_id, (0.0, ()))
        for message in missed:
            connection.send_kernel_message(message)

    def expect(self, client_id: str) -> None:
        """A client of a previous server (adopt.py): what the kernel sends from now on is kept for
        it, as for a client that went away, until it reconnects with its session_id."""
        if client_id and client_id not in self.live and client_id not in self.away and not self.closed:
            self.router.subscribe(self._on_message)
            self.away[client_id] = (time.monotonic(), deque(maxlen=AWAY_BUFFER_MESSAGES))

    def detach(self, client_id: str, connection: Connection) -> None:
        connections = self.live.get(client_id, set())
        connections.discard(connection)
        if not connections:
            self.live.pop(client_id, None)
            if client_id and not self.closed:
                self.away[client_id] = (time.monotonic(), deque(maxlen=AWAY_BUFFER_MESSAGES))

    def close(self, reason: str) -> None:
        """The session ended: every websocket is closed with the reason, every buffer dropped."""
        self.closed = True
        self.router.unsubscribe(self._on_message)
        connections = [c for group in self.live.values() for c in group]
        self.live.clear()
        self.away.clear()
        for connection in connections:
            connection.close_for(1001, reason[:120])  # 1001 going away; reasons are capped at 123 bytes
