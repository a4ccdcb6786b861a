"""A session: one VM restored from a template snapshot, its kernel, and the clients attached to it.

Its state is typed and says why: `running`, then `closed` (by whom) or `dead` (what died). Once it
has ended, every call on it raises the SessionGone that says so (HTTP 410), and every cell that
was running or waiting ends with it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import (GuestBrokeLink, GuestProtocolError, LinkClosed, ServerRestarted, SessionClosed, SessionGone,
                      VMDied)
from .. import network
from ..kernel import Kernel
from ..kernel.agent import RunResult
from ..kernel.engine import EventCallback
from ..kernel.results import ExecutionResult
from ..templates import BuiltTemplate
from ..vm.backend import VM, Snapshot, VMBackend
from ..vm.workdir import Workdir
from . import pause
from .channels import ClientChannels
from .contexts import SessionContexts

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..network import EgressEndpoint, NetworkPolicy

log = logging.getLogger("vmcell.sessions")

# After its link breaks, how long a VM gets to show it exited (then it is a dead VM, not a broken link).
VM_EXIT_WAIT_S = 1.0
# A stopping server waits this long for a session's save or fork in progress before leaving it.
DETACH_WAIT_S = 30.0


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
    vm: VM | None  # None while the session is saved to disk
    kernel: Kernel
    identity: Identity
    backend: VMBackend
    workdir: Workdir  # the VM's sockets, the session's writable disk, its saved states
    base: Snapshot  # the RAM image the VM maps copy-on-write and the state it was restored from
    env: dict[str, str] = field(default_factory=dict)
    durable: bool = False  # its VM outlives the server (registry.py); otherwise it dies with us
    created_at: float = field(default_factory=time.time)
    restore_ms: float = 0.0
    last_activity: float = field(default_factory=time.time)
    expires_at: float | None = None  # absolute lifetime end
    idle_timeout: float | None = None  # seconds without activity before the session is reaped
    state: SessionState = SessionState.RUNNING
    gone: SessionGone | None = None  # why it ended: what every later call on it raises
    channels: ClientChannels = field(init=False)
    contexts: SessionContexts = field(init=False)  # its code contexts besides the default kernel
    on_end: Callable[["Session"], None] | None = None  # the manager's: reap and remember
    # The manager's: persist a state change (registry.py); None for ephemeral sessions.
    on_change: Callable[["Session"], None] | None = None
    paused_at: float | None = None
    generation: int = 0  # how many times it was saved (names its saved-N directory)
    # A cell a previous server sent and never saw end, interrupted on adoption (adopt.py).
    interrupted_cell: dict | None = None
    # Network (interpreter/network/): its allow list, and the egress endpoint while its VM runs.
    network: "NetworkPolicy | None" = None
    # The kernelspec name a gateway client started it under when that is not the template's (the
    # python3 alias): the kernel model reports it back, so a notebook keeps its kernelspec.
    kernel_name: str | None = None
    egress: "EgressEndpoint | None" = field(default=None, repr=False)
    # The manager's Prometheus hooks (interpreter/metrics.py): its cells and egress refusals count there.
    metrics: "Metrics | None" = field(default=None, repr=False)
    _dying: asyncio.Task | None = field(default=None, repr=False)
    # Pause, save, resume and fork take turns on this lock; requests wait on it, never fail.
    _transition: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _in_use: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.channels = ClientChannels(self.kernel.router)
        self.contexts = SessionContexts(self)
        self.kernel.engine.on_activity = self.touch
        if self.metrics is not None:
            self.kernel.engine.on_cell_end = self.metrics.cell_ended
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
        """Not ended and its VM up (or saved, ready to come back)."""
        if self.state == SessionState.SAVED:
            return True
        return self.gone is None and self.vm is not None and self.vm.running() and not self.link.closed

    def check(self) -> None:
        if self.gone is not None:
            raise self.gone

    # ---- running, paused, saved (pause.py does the work) ----------------------------------------

    @property
    def idle(self) -> bool:
        return not self._in_use and not self.engine.busy and not self.contexts.busy

    async def ensure_running(self) -> None:
        """Brings a paused or saved session back before a request uses it; waits for a transition
        in progress (a pause, a save, a fork) instead of failing."""
        self.check()
        if self.state == SessionState.RUNNING and not self._transition.locked():
            return
        async with self._transition:
            self.check()
            if self.state == SessionState.PAUSED:
                await pause.wake(self)
            elif self.state == SessionState.SAVED:
                await pause.load(self)

    @contextlib.asynccontextmanager
    async def _use(self):
        """A request in progress: the session runs, and no pause or save starts under it."""
        await self.ensure_running()
        self._in_use += 1
        self.touch()
        try:
            yield
        finally:
            self._in_use -= 1
            self.touch()

    async def _until_idle(self) -> None:
        while not self.idle:
            await asyncio.sleep(0.02)

    async def suspend(self) -> bool:
        """Stops the VM in memory (no CPU). False if it was busy or not running."""
        async with self._transition:
            if self.state != SessionState.RUNNING or not self.idle or self.gone is not None:
                return False
            await pause.suspend(self)
            return True

    async def wake(self) -> None:
        await self.ensure_running()

    async def save(self, wait_idle: bool = True) -> None:
        """Saves the VM to disk and frees its RAM (state `saved`); the next request restores it.
        Waits for running cells and requests to finish first (new ones wait for the restore)."""
        async with self._transition:
            self.check()
            if self.state == SessionState.SAVED:
                return
            if wait_idle:
                await self._until_idle()
            elif not self.idle:
                return
            await pause.save(self)

    def _set_state(self, state: SessionState) -> None:
        self.state = state
        self.paused_at = time.time() if state in (SessionState.PAUSED, SessionState.SAVED) else None
        if self.on_change is not None:
            self.on_change(self)

    def info(self) -> dict:
        lifecycle = self.kernel.lifecycle
        return {
            "id": self.id,
            "template": self.template.spec.name,
            "hostname": self.identity.hostname,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "idle_timeout": self.idle_timeout,
            "last_activity": self.last_activity,
            "paused_at": self.paused_at,
            "restore_ms": round(self.restore_ms, 1),
            "alive": self.alive,
            "state": self.state.value,
            "cause": self.cause,
            "durable": self.durable,
            "interrupted_cell": self.interrupted_cell,
            "network": self.network.public() if self.network is not None else None,  # header values redacted
            "kernel": {"state": lifecycle.state.value, "execution_state": lifecycle.execution_state,
                       "restarts": lifecycle.restarts, "last_death": lifecycle.last_death,
                       "memory_max": lifecycle.memory_max, "memory_high": lifecycle.memory_high,
                       "oom_kills": lifecycle.oom_kills, "memory_interrupts": self.engine.memory_interrupts},
            "accel": self.template.accel.name,
            "contexts": [c.public() for c in self.contexts.all()],
        }

    def context_changed(self) -> None:
        """A code context was made or removed: the registry row holds them (adoption re-attaches them)."""
        if self.on_change is not None and self.gone is None:
            self.on_change(self)

    # ---- cells and the kernel ---------------------------------------------------------------

    async def execute(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None,
                      on_event: EventCallback | None = None, context: str | None = None,
                      language: str | None = None) -> ExecutionResult:
        """`context` (an id) or `language` (its default context, made on first use): contexts.py."""
        self.check()
        self.contexts.resolve(language, context)  # 400 / 404 before anything waits
        async with self._use():
            engine = (await self.contexts.for_cell(language, context)).engine
            return await engine.execute(code, timeout=timeout, env=env, on_event=on_event)

    def stream(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None,
               context: str | None = None, language: str | None = None):
        """Async iterator of OutputEvents for one cell, ending with `end` (or a fault's error event)."""
        self.check()
        self.contexts.resolve(language, context)
        return self._stream(code, timeout, env, context, language)

    async def _stream(self, code: str, timeout: float | None, env: dict[str, str] | None,
                      context: str | None = None, language: str | None = None):
        async with self._use():
            engine = (await self.contexts.for_cell(language, context)).engine
            events = engine.stream(code, timeout=timeout, env=env)
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()  # the engine's cleanup: a client that left gets its cell stopped

    async def interrupt(self) -> None:
        async with self._use():
            await self.engine.interrupt()

    async def restart(self) -> None:
        async with self._use():
            await self.kernel.lifecycle.restart()

    # ---- code contexts (contexts.py) ------------------------------------------------------------

    async def create_context(self, language: str | None = None, cwd: str | None = None):
        self.contexts.check_language(language)
        self.contexts.check_cwd(cwd)
        async with self._use():
            return await self.contexts.create(language, cwd)

    async def remove_context(self, context_id: str) -> None:
        self.contexts.get(context_id)
        async with self._use():
            await self.contexts.remove(context_id)

    async def restart_context(self, context_id: str):
        self.contexts.get(context_id)
        async with self._use():
            return await self.contexts.restart(context_id)

    async def interrupt_context(self, context_id: str) -> None:
        context = self.contexts.get(context_id)
        async with self._use():
            await context.engine.interrupt()

    async def _agent(self, call):
        """An agent call that the link's death turns into this session's verdict (410: VMDied, with
        its cause), not a bare LinkClosed: the link closes a moment before the verdict is known."""
        if self.gone is not None:
            call.close()  # never started
            raise self.gone
        try:
            return await call
        except LinkClosed:
            await self.check_after_link_failure()
            raise

    async def check_after_link_failure(self) -> None:
        """Raises this session's verdict (VMDied, SessionClosed, with its cause) once it is known:
        a call that saw the link fail learns why, rather than passing on a bare LinkClosed."""
        if self._dying is not None:
            await asyncio.wait({self._dying}, timeout=VM_EXIT_WAIT_S + 1)
        self.check()

    async def _agent_in_use(self, make_call):
        async with self._use():
            return await self._agent(make_call())

    async def ping(self) -> float:
        """Round trip to the guest agent, in milliseconds."""
        return await self._agent_in_use(lambda: self.kernel.agent.ping())

    async def apply_identity(self) -> None:
        await self.kernel.agent.identity(self.identity.entropy, self.identity.hostname, self.identity.machine_id)

    async def run(self, argv: list[str], timeout: float = 30.0, stdin: bytes = b"") -> RunResult:
        """Runs a program in the guest (tools and tests; user code goes through the kernel)."""
        return await self._agent_in_use(lambda: self.kernel.agent.run(argv, timeout, stdin))

    # ---- files (paths relative to the guest's home directory) ---------------------------------

    async def write_file(self, path: str, data: bytes) -> dict:
        return await self._agent_in_use(lambda: self.kernel.agent.files_write(path, data))

    async def read_file(self, path: str) -> bytes:
        return await self._agent_in_use(lambda: self.kernel.agent.files_read(path))

    async def list_files(self, path: str = ".") -> list[dict]:
        return await self._agent_in_use(lambda: self.kernel.agent.files_list(path))

    # ---- time -------------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.time()

    def expired(self, now: float) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return True
        return self.idle_timeout is not None and self.idle and now - self.last_activity >= self.idle_timeout

    # ---- the end ----------------------------------------------------------------------------

    def _end(self, state: SessionState, gone: SessionGone) -> bool:
        if self.gone is not None:
            return False
        self.gone = gone
        self._set_state(state)
        self.engine.fail(gone)
        self.contexts.fail(gone)
        self.kernel.lifecycle.close()
        self.channels.close(str(gone))
        return True

    def _on_link_closed(self, failure: Exception) -> None:
        if self.gone is None:
            self._dying = asyncio.ensure_future(self._died(failure))  # held: the loop keeps weak references

    async def _died(self, failure: Exception) -> None:
        status = await self.vm.wait_exit(VM_EXIT_WAIT_S) if self.vm is not None else None
        if self.gone is not None:
            return  # closed on purpose meanwhile
        if status is not None:
            gone = VMDied(f"session {self.id} is dead: its VM exited ({self.vm.exit_description(status)})")
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
            await network.detach(self)
            await self.link.close()
        finally:
            if self.vm is not None:
                await self.vm.stop()  # reaps QEMU and removes the workdir (overlay disk included)
            self.workdir.remove()  # a saved session's disk and state

    async def detach(self, reason: str) -> None:
        """The server stops but the session lives on (durable): its cells end with ServerRestarted,
        its websockets close, and its VM is left running (or paused, or saved) for the next server.
        A save or fork in progress finishes first (bounded: a stuck one is left as it is)."""
        restarted = ServerRestarted(f"session {self.id}: {reason}; the session lives on, "
                                    "this cell's outcome is unknown")
        self.engine.fail(restarted)
        self.contexts.fail(restarted)
        self.channels.close(reason)
        try:  # held for good: this server starts no transition of it any more
            await asyncio.wait_for(self._transition.acquire(), DETACH_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("session %s: a transition did not finish within %gs; detaching anyway", self.id,
                        DETACH_WAIT_S)
        if self.on_change is not None:
            self.on_change(self)  # its state as we leave it, for the next server
        await network.detach(self)
        await self.link.detach()
        if self.vm is not None:
            await self.vm.detach()
