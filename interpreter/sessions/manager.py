"""Creates, finds, limits and reaps sessions. The only place that turns a template into a live VM.

Sessions that ended (closed, expired, or dead) are remembered by id, with their cause, so a client
asking for one learns it is gone and why (HTTP 410) rather than that it never existed (404).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict

from ..catalog import TemplateCatalog
from ..config import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_TEMPLATE,
    ENDED_SESSIONS_REMEMBERED,
    QEMU_IMG_BINARY,
    RESTORE_TIMEOUT_S,
)
from ..errors import SessionGone, SessionLimitReached, SessionNotFound
from ..images.cache import require_tool
from ..kernel import Kernel
from ..kernel.agent import AgentClient
from ..kernel.link import GuestLink
from ..templates import BuiltTemplate
from ..vm.backend import VMBackend
from ..vm.qemu import QemuBackend, qemu_binary
from ..vm.workdir import Workdir, reap_stale_workdirs
from .session import Identity, Session

log = logging.getLogger("vmcell.sessions")


class SessionManager:
    def __init__(self, backend: VMBackend | None = None, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 catalog: TemplateCatalog | None = None):
        self.backend = backend or (catalog.backend if catalog is not None else QemuBackend())
        # Which build each template name restores from: resolved once, then pinned (catalog.py).
        # A catalog passed in is its owner's to close; the one made here closes with the manager.
        self.catalog = catalog if catalog is not None else TemplateCatalog(self.backend)
        self._owns_catalog = catalog is None
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._ended: OrderedDict[str, SessionGone] = OrderedDict()
        self._reaping: set[asyncio.Task] = set()
        self._starting = 0
        # What a dead predecessor left (VMs, sockets, overlays) goes before we add our own.
        reap_stale_workdirs()

    async def __aenter__(self) -> "SessionManager":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close_all()
        if self._owns_catalog:
            await self.catalog.close()

    def list(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        gone = self._ended.get(session_id)
        if gone is not None:
            raise type(gone)(str(gone))
        raise SessionNotFound(f"no session with id {session_id!r}")

    async def create(self, template: str = DEFAULT_TEMPLATE, env: dict[str, str] | None = None,
                     lifetime: float | None = None, idle_timeout: float | None = None) -> Session:
        """A session restored from `template`'s snapshot; `env` holds for every cell of the session.
        It is closed `lifetime` seconds after creation, or after `idle_timeout` seconds unused."""
        qemu_binary()  # fail at once, naming the package, before any other work
        require_tool(QEMU_IMG_BINARY)
        if len(self._sessions) + self._starting >= self.max_sessions:
            raise SessionLimitReached(f"{self.max_sessions} sessions are running (the configured maximum); "
                                      "close one first")
        built = await self.catalog.get(template)
        self._starting += 1
        try:
            session = await self._restore(built, env or {})
        finally:
            self._starting -= 1
        if lifetime is not None:
            session.expires_at = session.created_at + lifetime
        session.idle_timeout = idle_timeout
        session.on_end = self._on_session_end
        self._sessions[session.id] = session
        return session

    async def _restore(self, built: BuiltTemplate, env: dict[str, str]) -> Session:
        session_id = str(uuid.uuid4())
        start = time.perf_counter()
        workdir = Workdir.create()
        vm = link = None
        try:
            # The session's writable layer: a copy-on-write overlay of the template's snapshot-time disk.
            writable = await self.backend.overlay(built.rw_image, workdir.file("rw.qcow2"))
            vm = await self.backend.restore(built.vm_config(writable), workdir, built.state_file)
            link = await GuestLink.connect(vm.link_path, name=f"session {session_id[:8]}")
            agent = AgentClient(link)
            await agent.handshake(RESTORE_TIMEOUT_S)
            kernel = Kernel.attach(agent, built.kernel_key, env, built.spec.preload)
            session = Session(session_id, built, vm, kernel, Identity.fresh(session_id))
            await session.apply_identity()
            # The warm kernel's RNGs were seeded before the snapshot, and its process env is the
            # template's: the first cell reseeds and applies the env, whichever door it comes from.
            kernel.engine.after_restore(env)
            session.restore_ms = (time.perf_counter() - start) * 1000
        except BaseException:
            if link is not None:
                await link.close()
            if vm is not None:
                await vm.stop()
            workdir.remove()
            raise
        log.info("session %s restored from %s in %.0f ms (%s)", session_id, built.spec.name,
                 session.restore_ms, built.accel.name.upper())
        return session

    def _remember(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if session.gone is not None:
            self._ended[session.id] = session.gone
            while len(self._ended) > ENDED_SESSIONS_REMEMBERED:
                self._ended.popitem(last=False)

    def _on_session_end(self, session: Session) -> None:
        """A session died by itself (its VM exited, its guest broke the link): reap it now."""
        self._remember(session)
        task = asyncio.ensure_future(session.release())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    # ---- lifecycle (pause.py, fork.py): the API the server and the SDK use -----------------------

    async def pause(self, session_id: str) -> Session:
        """Saves the session to disk and frees its RAM (state `saved`); any later request resumes it."""
        raise NotImplementedError

    async def resume(self, session_id: str) -> Session:
        """Brings a paused or saved session back to `running` (a no-op for a running one)."""
        raise NotImplementedError

    async def fork(self, session_id: str, count: int = 1) -> list[Session]:
        """`count` new sessions with the parent's memory, kernel and files at one instant, each with a
        fresh identity; the parent keeps running. InvalidRequest (400) for a count outside 1..limit."""
        raise NotImplementedError

    def set_timeout(self, session_id: str, seconds: float) -> Session:
        """E2B's set_timeout: the session is closed `seconds` from now."""
        raise NotImplementedError

    async def close(self, session_id: str, reason: str = "closed by a client") -> None:
        session = self.get(session_id)
        session.mark_closed(reason)
        self._remember(session)  # from now on its id answers 410 with the reason, even while QEMU quits
        await session.release()

    async def close_expired(self) -> list[str]:
        """Closes sessions past their lifetime or idle timeout, and ones whose VM or link died."""
        now = time.time()
        doomed = [(s.id, "its lifetime or idle timeout passed" if s.expired(now) else "its VM stopped")
                  for s in self._sessions.values() if s.expired(now) or not s.vm.running()]
        for session_id, reason in doomed:
            log.info("closing session %s (%s)", session_id, reason)
            try:
                await self.close(session_id, reason)
            except (SessionNotFound, SessionGone):
                pass  # closed meanwhile by its owner
        return [session_id for session_id, _ in doomed]

    async def close_all(self, reason: str = "the server is stopping") -> None:
        sessions = list(self._sessions.values())
        for session in sessions:
            session.mark_closed(reason)
            self._remember(session)
        await asyncio.gather(*(s.release() for s in sessions), *self._reaping, return_exceptions=True)
