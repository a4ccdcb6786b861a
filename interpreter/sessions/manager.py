"""Creates, finds, limits and reaps sessions. The only place that turns a template into a live VM.

Sessions that ended (closed, expired, or dead) are remembered by id, with their cause, so a client
asking for one learns it is gone and why (HTTP 410) rather than that it never existed (404).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from ..catalog import TemplateCatalog
from ..config import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_TEMPLATE,
    ENDED_SESSIONS_REMEMBERED,
    QEMU_IMG_BINARY,
    RESTORE_TIMEOUT_S,
    run_dir,
)
from ..errors import InvalidRequest, SessionGone, SessionLimitReached, SessionNotFound, VMStartError
from ..images.cache import require_tool
from .. import network as networking
from ..kernel import Kernel
from ..kernel.agent import AgentClient
from ..kernel.link import GuestLink
from ..metrics import Metrics
from ..templates import BuiltTemplate
from ..vm.backend import MemoryFile, Snapshot, VMBackend
from ..vm.qemu import QemuBackend, qemu_binary
from ..vm.workdir import Workdir, reap_stale_workdirs
from . import fork as forking
from .adopt import AdoptionFailed, adopt
from .idle import IdlePolicy
from .pause import WRITABLE_DISK
from .pool import POOL_NICE, POOL_WARMUP_CELL, POOL_WARMUP_TIMEOUT_S, WarmPool
from .registry import SessionRecord, SessionRegistry
from .session import Identity, Session, SessionState
from .settings import LifecycleSettings

log = logging.getLogger("vmcell.sessions")


class SessionManager:
    def __init__(self, backend: VMBackend | None = None, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 catalog: TemplateCatalog | None = None, lifecycle: LifecycleSettings | None = None):
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
        # A library user's manager neither pools nor auto-pauses unless told; `vmcell serve` tells it.
        self.lifecycle = lifecycle or LifecycleSettings(auto_pause_s=None)
        self.pool = WarmPool(self, self.lifecycle.pool)
        self.idle_policy = IdlePolicy(self, self.lifecycle.auto_pause_s, self.lifecycle.save_after_s)
        self.fork_snapshots = forking.ForkSnapshots()
        # Durable sessions (a state dir): their VMs outlive us, and the next manager adopts them.
        self.registry = SessionRegistry(self.lifecycle.state_dir) if self.lifecycle.state_dir else None
        self.metrics = Metrics(self)  # this manager's Prometheus registry (GET /metrics)
        # What a dead predecessor left (VMs, sockets, overlays) goes before we add our own.
        reap_stale_workdirs()
        self._started = self._opened = False

    @property
    def durable(self) -> bool:
        return self.registry is not None

    def vm_root(self):
        return self.registry.vms if self.registry is not None else run_dir()

    def snapshot_root(self):
        return self.registry.forks if self.registry is not None else run_dir()

    async def start(self) -> None:
        """Takes back the registry's sessions (durable), then starts the background work: the
        pool's refills, the idle policy. Called once the loop runs."""
        if self._started:
            return
        self._started = True
        jailer = getattr(self.backend, "jailer", None)
        if jailer is not None:
            await jailer()  # what confinement VMs get here: decided and logged before the first one
        await self.open()
        self.pool.start()
        self.idle_policy.start()

    async def open(self) -> None:
        """Durable: takes the state dir and adopts its sessions (before any new one is made there)."""
        if self._opened:
            return
        self._opened = True
        if self.registry is not None:
            self.registry.open()
            await self._adopt_all()

    async def _adopt_all(self) -> None:
        records = self.registry.records()
        adopted = await asyncio.gather(*(adopt(self, r) for r in records), return_exceptions=True)
        kept_vms, kept_forks = set(), set()
        for record, result in zip(records, adopted):
            if isinstance(result, BaseException):
                if not isinstance(result, AdoptionFailed):
                    log.error("adopting session %s failed", record.id, exc_info=result)
                    result = AdoptionFailed(f"session {record.id} is gone: the restarted server could not take "
                                            f"it back ({result!r})")
                log.warning("%s", result)
                self.registry.forget(record.id)
                self._ended[record.id] = result
                continue
            kept_vms.add(result.workdir.path)
            if record.fork_capture:
                capture = Path(record.fork_capture)
                kept_forks.add(capture)
                self.fork_snapshots.hold_directory(capture, record.id)
            self._admit(result, None, result.idle_timeout, expires_at=result.expires_at)
            log.info("session %s adopted (%s)", result.id, result.state.value)
        self.registry.reap_unowned(kept_vms, kept_forks)

    async def __aenter__(self) -> "SessionManager":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    async def shutdown(self, reason: str = "the server is stopping") -> None:
        """Ephemeral sessions are closed; durable ones are left running (or paused, or saved) for
        the next server on the same state dir."""
        await self.idle_policy.close()
        await self.pool.close()
        if self.registry is not None:
            await self.detach_all(reason)
            self.registry.close()
        else:
            await self.close_all(reason)
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
                     lifetime: float | None = None, idle_timeout: float | None = None,
                     network=None, kernel_name: str | None = None) -> Session:
        """A session restored from `template`'s snapshot; `env` holds for every cell of the session.
        It is closed `lifetime` seconds after creation, or after `idle_timeout` seconds unused.
        `network`: {"allow": [...]} (interpreter/network/policy.py), False for none, None for the
        template's default (none unless its spec has one); InvalidNetwork (400) if malformed.
        `kernel_name`: the kernelspec alias a gateway client asked for (Session.kernel_name)."""
        qemu_binary()  # fail at once, naming the package, before any other work
        require_tool(QEMU_IMG_BINARY)
        policy = networking.NetworkPolicy.parse(network) if network is not None else None
        await self.open()
        self._check_room(1)
        if network is None:
            policy = (await self.catalog.get(template)).network_default
        env = env or {}
        session = await self.pool.take(template, env)
        source = "template" if session is None else "pool"
        if session is None:
            built = await self.catalog.get(template)
            self._starting += 1
            try:
                session = await self._restore(built, Snapshot(built.memory_file, built.state_file),
                                              (built.rw_image, "raw"), env)
            finally:
                self._starting -= 1
        try:
            session.network = policy
            session.kernel_name = kernel_name
            await networking.attach(session)  # a pooled VM too: network is given when taken
            self._admit(session, lifetime, idle_timeout)
        except BaseException:  # e.g. the registry could not record it: never a VM nobody owns
            await session.close("it could not be admitted")
            raise
        self.metrics.created_from(source)
        return session

    def _check_room(self, count: int) -> None:
        if len(self._sessions) + self._starting + count > self.max_sessions:
            raise SessionLimitReached(f"{self.max_sessions} sessions exist (the configured maximum, paused and "
                                      "saved ones included); close one first")

    def _admit(self, session: Session, lifetime: float | None, idle_timeout: float | None,
               expires_at: float | None = None) -> None:
        session.expires_at = time.time() + lifetime if lifetime is not None else expires_at
        session.idle_timeout = idle_timeout
        session.on_end = self._on_session_end
        session.on_change = self._on_session_change
        self._sessions[session.id] = session
        self._on_session_change(session)

    def _on_session_change(self, session: Session) -> None:
        if self.registry is not None and session.gone is None:
            self.registry.put(SessionRecord.of(session, self.fork_snapshots.held_by(session.id)))

    async def _restore(self, built: BuiltTemplate, base: Snapshot, disk: tuple, env: dict[str, str],
                       identity: bool = True, nice: int = 0, contexts: list[dict] | None = None) -> Session:
        """A session restored from `base` (a template's snapshot or a fork's capture), with its own
        overlay over `disk` (path, format). `identity=False` (the pool) leaves it to whoever takes it.
        `contexts`: the code contexts the capture's VM holds (a fork's parent's, contexts.py)."""
        session_id = str(uuid.uuid4())
        start = time.perf_counter()
        workdir = Workdir.create(self.vm_root(), owner={"registry": True} if self.durable else None)
        vm = link = None
        try:
            # The session's writable layer: a copy-on-write overlay of the snapshot-time disk.
            writable = await self.backend.overlay(disk[0], workdir.file(WRITABLE_DISK), backing_format=disk[1])
            config = built.vm_config(writable, MemoryFile(base.memory, shared=False))
            vm = await self.backend.restore(config, workdir, base.state, die_with_owner=not self.durable, nice=nice)
            link = await GuestLink.connect(vm.link_path, name=f"session {session_id[:8]}")
            agent = AgentClient(link)
            # The router takes Jupyter frames from the start: a fork's child may already be printing
            # the output of a cell the parent was running when it was captured.
            kernel = Kernel.attach(agent, built.kernel_key, env, built.spec.preload)
            session = Session(session_id, built, vm, kernel, Identity.fresh(session_id), backend=self.backend,
                              workdir=workdir, base=base, env=dict(env), durable=self.durable, metrics=self.metrics)
            session.contexts.adopt_records(contexts or [])  # their routers too, before any frame comes
            await agent.handshake(RESTORE_TIMEOUT_S)
            if identity:
                await self._fresh_identity(session, env)
            session.restore_ms = (time.perf_counter() - start) * 1000
            self.metrics.restored(session.restore_ms / 1000)
        except BaseException:
            if link is not None:
                await link.close()
            if vm is not None:
                await vm.stop()
            workdir.remove()
            raise
        log.info("session %s restored from %s in %.0f ms (%s)", session_id, base.state.parent.name,
                 session.restore_ms, built.accel.name.upper())
        return session

    async def _fresh_identity(self, session: Session, env: dict[str, str]) -> None:
        await session.apply_identity()  # entropy, clock, hostname, machine-id
        # The kernel's RNGs were seeded before the snapshot, and its process env is the template's
        # (or the parent's): the first cell reseeds and applies the env, whichever door it comes from.
        session.env = dict(env)
        session.kernel.engine.after_restore(env)
        session.contexts.after_restore(env)

    # ---- the pool's side (pool.py) ------------------------------------------------------------

    async def restore_for_pool(self, template: str) -> Session:
        built = await self.catalog.get(template)
        session = await self._restore(built, Snapshot(built.memory_file, built.state_file), (built.rw_image, "raw"),
                                      {}, identity=False, nice=POOL_NICE)
        # Run the identity op once with a throwaway identity, and one silent cell: under TCG the first
        # run of guest code in a new QEMU process pays for its translation (identity ~100 ms, the
        # kernel's execute path ~120 ms more), which the take and the user's first cell must not. The
        # cell is silent (no execution count, not in metrics); the take's identity re-arms the reseed.
        try:
            await session.kernel.agent.identity(os.urandom(64), "vmcell-pooled", uuid.uuid4().hex)
            warmup = await session.kernel.engine.execute(POOL_WARMUP_CELL, timeout=POOL_WARMUP_TIMEOUT_S, silent=True)
            if warmup.error is not None:
                raise VMStartError(f"the pool's warm-up cell failed: {warmup.error.name}: {warmup.error.value}")
            await session.vm.pause()
        except BaseException:
            await session.close("its pool warm-up failed")  # never a half-made VM left running
            raise
        session.state = SessionState.PAUSED
        return session

    async def adopt_pooled(self, session: Session, env: dict[str, str]) -> None:
        await session.vm.resume()
        session.vm.renice(0)
        session.state = SessionState.RUNNING
        await self._fresh_identity(session, env)  # now, not when it was restored

    def _remember(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is not None:
            self.metrics.ended_session(session)
        self.fork_snapshots.release(session.id)
        if self.registry is not None:
            self.registry.forget(session.id)
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
        session = self.get(session_id)
        await session.save()
        return session

    async def resume(self, session_id: str) -> Session:
        """Brings a paused or saved session back to `running` (a no-op for a running one)."""
        session = self.get(session_id)
        await session.ensure_running()
        return session

    async def fork(self, session_id: str, count: int = 1) -> list[Session]:
        """`count` new sessions with the parent's memory, kernel and files at one instant, each with a
        fresh identity; the parent keeps running. InvalidRequest (400) for a count outside 1..limit."""
        parent = self.get(session_id)
        forking.check_count(count, self.max_sessions)
        self._check_room(count)
        self._starting += count
        start = time.perf_counter()
        try:
            snapshot = await forking.capture(parent, self.snapshot_root())
            contexts = parent.contexts.records()  # the capture's VM holds their kernels
            try:
                children = await forking.gather_children([
                    self._restore(parent.template, snapshot, (snapshot.disk, "qcow2"), parent.env,
                                  contexts=contexts)
                    for _ in range(count)])
            except BaseException:
                self.fork_snapshots.drop_unheld(snapshot.state.parent)
                raise
        finally:
            self._starting -= count
        self.fork_snapshots.hold(snapshot, [c.id for c in children])
        try:
            for child in children:  # the parent's network policy, on an egress of its own
                child.network = parent.network
                await networking.attach(child)
        except BaseException:
            await asyncio.gather(*(c.close("its egress could not be connected") for c in children),
                                 return_exceptions=True)
            raise
        for child in children:
            self._admit(child, None, parent.idle_timeout)
        self.metrics.forked(time.perf_counter() - start)
        self.metrics.created_from("fork", count)
        return children

    def set_timeout(self, session_id: str, seconds: float) -> Session:
        """E2B's set_timeout: the session is closed `seconds` from now."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
            raise InvalidRequest(f"timeout must be a positive number of seconds, got {seconds!r}")
        session = self.get(session_id)
        session.check()
        session.expires_at = time.time() + seconds
        self._on_session_change(session)
        return session

    async def close(self, session_id: str, reason: str = "closed by a client") -> None:
        session = self.get(session_id)
        session.mark_closed(reason)
        self._remember(session)  # from now on its id answers 410 with the reason, even while QEMU quits
        await session.release()

    async def close_expired(self) -> list[str]:
        """Closes sessions past their lifetime or idle timeout, and ones whose VM or link died."""
        now = time.time()
        doomed = [(s.id, "its lifetime or idle timeout passed" if s.expired(now) else "its VM stopped")
                  for s in self._sessions.values() if s.expired(now) or not s.alive and s.gone is None]
        for session_id, reason in doomed:
            log.info("closing session %s (%s)", session_id, reason)
            try:
                await self.close(session_id, reason)
            except (SessionNotFound, SessionGone):
                pass  # closed meanwhile by its owner
        return [session_id for session_id, _ in doomed]

    async def detach_all(self, reason: str = "the server is stopping") -> None:
        """Durable sessions stay as they are, for the next server: each waits for a transition in
        progress (a save, a fork), ends its cells with ServerRestarted, and lets go of its VM."""
        sessions = list(self._sessions.values())
        await asyncio.gather(*(s.detach(reason) for s in sessions), *self._reaping, return_exceptions=True)
        self._sessions.clear()
        log.info("left %d durable sessions for the next server", len(sessions))

    async def close_all(self, reason: str = "the server is stopping") -> None:
        sessions = list(self._sessions.values())
        for session in sessions:
            session.mark_closed(reason)
            self._remember(session)
        await asyncio.gather(*(s.release() for s in sessions), *self._reaping, return_exceptions=True)
