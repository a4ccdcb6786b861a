"""A session: one VM restored from a template snapshot, its kernel, and the clients attached to it.

Its state is typed and says why: `running`, then `closed` (by whom) or `dead` (what died). Once it
has ended, every call on it raises the SessionGone that says so (HTTP 410), and every cell that
was running or waiting ends with it at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..errors import GuestBrokeLink, GuestProtocolError, LinkClosed, SessionClosed, SessionGone, VMDied
from ..kernel import Kernel
from ..kernel.agent import RunResult
from ..kernel.engine import EventCallback
from ..kernel.results import ExecutionResult
from ..templates import BuiltTemplate
from ..vm.backend import VM
from .channels import ClientChannels

log = logging.getLogger("vmcell.sessions")

# After its link breaks, how long a VM gets to show it exited (then it is a dead VM, not a broken link).
VM_EXIT_WAIT_S = 1.0


class SessionState(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"  # VM stopped in memory (no CPU); the next request resumes it
    SAVED = "saved"  # on disk (RAM freed); the next request restores it
    CLOSED = "closed"
    DEAD = "dead"


@dataclass(frozen=True)
class Identity:
    """What makes a clone of the snapshot its own machine."""

    hostname: str
    machine_id: str
    entropy: bytes = field(repr=False)

    @classmethod
    def fresh(cls, session_id: str) -> "Identity":
        return cls(hostname=f"vmcell-{session_id[:8]}", machine_id=uuid.uuid4().hex, entropy=os.urandom(64))


@dataclass(eq=False)
class Session:
    id: str
    template: BuiltTemplate
    vm: VM
    kernel: Kernel
    identity: Identity
    created_at: float = field(default_factory=time.time)
    restore_ms: float = 0.0
    last_activity: float = field(default_factory=time.time)
    expires_at: float | None = None  # absolute lifetime end
    idle_timeout: float | None = None  # seconds without activity before the session is reaped
    state: SessionState = SessionState.RUNNING
    gone: SessionGone | None = None  # why it ended: what every later call on it raises
    channels: ClientChannels = field(init=False)
    on_end: Callable[["Session"], None] | None = None  # the manager's: reap and remember
    _dying: asyncio.Task | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.channels = ClientChannels(self.kernel.router)
        self.kernel.engine.on_activity = self.touch
        self.kernel.agent.link.add_close_callback(self._on_link_closed)

    @property
    def link(self):
        return self.kernel.agent.link

    @property
    def engine(self):
        return self.kernel.engine

    @property
    def cause(self) -> str | None:
        return str(self.gone) if self.gone is not None else None

    @property
    def alive(self) -> bool:
        return self.state == SessionState.RUNNING and self.vm.running() and not self.link.closed

    def check(self) -> None:
        if self.gone is not None:
            raise self.gone

    # ---- cells and the kernel ---------------------------------------------------------------

    async def execute(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None,
                      on_event: EventCallback | None = None) -> ExecutionResult:
        self.check()
        return await self.engine.execute(code, timeout=timeout, env=env, on_event=on_event)

    def stream(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None):
        """Async iterator of OutputEvents for one cell, ending with `end` (or a fault's error event)."""
        self.check()
        return self.engine.stream(code, timeout=timeout, env=env)

    async def interrupt(self) -> None:
        self.check()
        await self.engine.interrupt()

    async def restart(self) -> None:
        self.check()
        await self.kernel.lifecycle.restart()

    async def _agent(self, call):
        """An agent call that the link's death turns into this session's verdict (410: VMDied, with
        its cause), not a bare LinkClosed: the link closes a moment before the verdict is known."""
        if self.gone is not None:
            call.close()  # never started
            raise self.gone
        try:
            return await call
        except LinkClosed:
            if self._dying is not None:
                await asyncio.wait({self._dying}, timeout=VM_EXIT_WAIT_S + 1)
            self.check()
            raise

    async def ping(self) -> float:
        """Round trip to the guest agent, in milliseconds."""
        return await self._agent(self.kernel.agent.ping())

    async def apply_identity(self) -> None:
        await self.kernel.agent.identity(self.identity.entropy, self.identity.hostname, self.identity.machine_id)

    async def run(self, argv: list[str], timeout: float = 30.0, stdin: bytes = b"") -> RunResult:
        """Runs a program in the guest (tools and tests; user code goes through the kernel)."""
        return await self._agent(self.kernel.agent.run(argv, timeout, stdin))

    # ---- files (paths relative to the guest's home directory) ---------------------------------

    async def write_file(self, path: str, data: bytes) -> dict:
        self.touch()
        return await self._agent(self.kernel.agent.files_write(path, data))

    async def read_file(self, path: str) -> bytes:
        self.touch()
        return await self._agent(self.kernel.agent.files_read(path))

    async def list_files(self, path: str = ".") -> list[dict]:
        self.touch()
        return await self._agent(self.kernel.agent.files_list(path))

    # ---- time -------------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.time()

    def expired(self, now: float) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return True
        return self.idle_timeout is not None and not self.engine.busy and now - self.last_activity >= self.idle_timeout

    # ---- the end ----------------------------------------------------------------------------

    def _end(self, state: SessionState, gone: SessionGone) -> bool:
        if self.gone is not None:
            return False
        self.state, self.gone = state, gone
        self.engine.fail(gone)
        self.kernel.lifecycle.close()
        self.channels.close(str(gone))
        return True

    def _on_link_closed(self, failure: Exception) -> None:
        if self.gone is None:
            self._dying = asyncio.ensure_future(self._died(failure))  # held: the loop keeps weak references

    async def _died(self, failure: Exception) -> None:
        status = await self.vm.wait_exit(VM_EXIT_WAIT_S)
        if self.gone is not None:
            return  # closed on purpose meanwhile
        if status is not None:
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            gone = VMDied(f"session {self.id} is dead: its VM exited ({how})")
        elif isinstance(failure, GuestProtocolError):
            gone = GuestBrokeLink(f"session {self.id} is dead: its guest broke the link protocol ({failure})")
        else:
            gone = VMDied(f"session {self.id} is dead: its guest link failed ({failure})")
        if self._end(SessionState.DEAD, gone):
            log.warning("%s", gone)
            if self.on_end is not None:
                self.on_end(self)

    def mark_closed(self, reason: str) -> None:
        """Ends every cell with SessionClosed and closes its websockets, at once (no await)."""
        self._end(SessionState.CLOSED, SessionClosed(f"session {self.id} was closed ({reason})"))

    async def close(self, reason: str = "closed by a client") -> None:
        """mark_closed, then reaps the VM and its files."""
        self.mark_closed(reason)
        await self.release()

    async def release(self) -> None:
        try:
            await self.link.close()
        finally:
            await self.vm.stop()  # reaps QEMU and removes the workdir (overlay disk included)
