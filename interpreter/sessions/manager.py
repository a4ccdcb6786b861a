"""Creates, finds, limits and reaps sessions. The only place that turns a template into a live VM."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from ..config import DEFAULT_MAX_SESSIONS, DEFAULT_TEMPLATE, QEMU_IMG_BINARY, RESTORE_TIMEOUT_S
from ..errors import SessionLimitReached, SessionNotFound
from ..images.cache import require_tool
from ..kernel.client import KernelClient
from ..kernel.link import GuestLink
from ..templates import BuiltTemplate, find_built
from ..vm.backend import VMBackend
from ..vm.qemu import QemuBackend, qemu_binary
from ..vm.workdir import Workdir, reap_stale_workdirs
from .session import Identity, Session

log = logging.getLogger("vmcell.sessions")


class SessionManager:
    def __init__(self, backend: VMBackend | None = None, max_sessions: int = DEFAULT_MAX_SESSIONS):
        self.backend = backend or QemuBackend()
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._starting = 0
        # What a dead predecessor left (VMs, sockets, overlays) goes before we add our own.
        reap_stale_workdirs()

    async def __aenter__(self) -> "SessionManager":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close_all()

    def list(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"no session with id {session_id!r}") from None

    async def create(self, template: str = DEFAULT_TEMPLATE, env: dict[str, str] | None = None,
                     lifetime: float | None = None, idle_timeout: float | None = None) -> Session:
        """A session restored from `template`'s snapshot; `env` holds for every cell of the session.
        It is closed `lifetime` seconds after creation, or after `idle_timeout` seconds unused."""
        qemu_binary()  # fail at once, naming the package, before any other work
        require_tool(QEMU_IMG_BINARY)
        if len(self._sessions) + self._starting >= self.max_sessions:
            raise SessionLimitReached(f"{self.max_sessions} sessions are running (the configured maximum); "
                                      "close one first")
        built = await find_built(template, self.backend)
        self._starting += 1
        try:
            session = await self._restore(built, env or {})
        finally:
            self._starting -= 1
        if lifetime is not None:
            session.expires_at = session.created_at + lifetime
        session.idle_timeout = idle_timeout
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
            await link.handshake(RESTORE_TIMEOUT_S)
            kernel = KernelClient(link, built.kernel_key, preload=built.spec.preload)
            session = Session(session_id, built, vm, link, kernel, Identity.fresh(session_id))
            await session.apply_identity()
            # The warm kernel's RNGs were seeded before the snapshot: every clone would draw the same
            # numbers. The first cell reseeds them from the fresh guest entropy and applies the env.
            kernel.after_restore(env)
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

    async def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"no session with id {session_id!r}")
        await session.close()

    async def close_expired(self) -> list[str]:
        """Closes sessions past their lifetime or idle timeout, and ones whose VM or link died."""
        now = time.time()
        doomed = [s.id for s in self._sessions.values() if s.expired(now) or not s.vm.running()]
        for session_id in doomed:
            log.info("closing session %s (expired or its VM stopped)", session_id)
            try:
                await self.close(session_id)
            except SessionNotFound:
                pass  # closed meanwhile by its owner
        return doomed

    async def close_all(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
