"""The kernel's life inside a session's VM: start, restart, death, and who hears about each.

Like jupyter_client's manager.py, this owns the process and takes callbacks: `on("dead", f)`,
`on("restarted", f)`. A kernel that dies (os._exit, out of memory, a crash) is restarted at once,
as Jupyter's restarter does, and the cell engine ends the cell that was running with KernelDied.
Restarts go through the guest's warm fork server when the guest has one, so they take about a
second under TCG instead of a cold Python start.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Callable

from vmcell_guest.wire import Channel

from ..config import KERNEL_READY_TIMEOUT_S
from ..errors import KernelDied, KernelNotReady, VmcellError
from .agent import KERNEL_DIED, MEMORY_LIMIT, AgentClient, MemoryEvent, byte_count
from .link import ControlEvent
from .router import KernelMessage, MessageRouter

log = logging.getLogger("vmcell.kernel")


class KernelState(str, enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"
    DEAD = "dead"  # died and could not be restarted (or the session is gone)


class KernelLifecycle:
    def __init__(self, agent: AgentClient, router: MessageRouter, key: bytes, env: dict[str, str] | None = None,
                 preload: tuple[str, ...] = ()):
        self.agent, self.router, self.key = agent, router, key
        self.env = dict(env or {})  # the kernel process's environment on every (re)start
        self.preload = preload
        self.state = KernelState.RUNNING
        self.execution_state = "idle"  # as the kernel last published it
        self.last_activity = time.time()
        self.restarts = 0
        self.last_death: str | None = None  # why the kernel last died, for errors and the session's info
        self.last_death_oom = False  # ... and whether the OOM killer did it (MemoryLimitExceeded)
        self.oom_kills = 0  # kernels the OOM killer killed in this session
        # The kernel cgroup's memory limit and high-water mark (bytes), as the guest last reported them
        # (kernel_start, memory events; None until then: a session restored from a snapshot has not said).
        self.memory_max: int | None = None
        self.memory_high: int | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._restart_lock = asyncio.Lock()
        self._restart_task: asyncio.Task | None = None
        self._callbacks: dict[str, list[Callable]] = {"dead": [], "restarting": [], "restarted": []}
        agent.on_event(self._on_agent_event)
        router.subscribe(self._on_message)

    def on(self, event: str, callback: Callable) -> None:
        self._callbacks[event].append(callback)

    def _fire(self, event: str, *args) -> None:
        for callback in list(self._callbacks[event]):
            try:
                callback(*args)
            except Exception:
                log.exception("kernel %s callback failed", event)

    def _on_message(self, message: KernelMessage) -> None:
        self.last_activity = time.time()
        if message.channel == Channel.IOPUB and message.msg_type == "status":
            state = message.content.get("execution_state")
            if isinstance(state, str):
                self.execution_state = state

    # ---- start, ready ------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = KERNEL_READY_TIMEOUT_S) -> dict:
        """kernel_info until the kernel answers: it may still be starting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await self.router.request(Channel.SHELL, "kernel_info_request", {}, timeout=1.0)
                return reply.content
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise KernelNotReady(f"the kernel did not answer kernel_info within {timeout:g}s") from None

    async def start(self) -> None:
        """(Re)starts the guest kernel with our key and waits until it answers."""
        reply = await self.agent.kernel_start(self.key, self.env, self.preload)
        limits = reply.get("limits") if isinstance(reply.get("limits"), dict) else {}
        self.memory_max, self.memory_high = byte_count(limits.get("memory_max")), byte_count(limits.get("memory_high"))
        await self.wait_ready()
        self.execution_state = "idle"

    async def running(self) -> None:
        """Returns once a kernel is up (at once, unless it is restarting); raises if none will be."""
        await self._running.wait()
        if self.state == KernelState.DEAD:
            raise KernelDied(f"the kernel is dead and could not be restarted: {self.last_death}")

    # ---- restart ----------------------------------------------------------------------------

    async def restart(self, reason: str = "restart requested") -> None:
        """A fresh kernel process (the guest kills the old one and everything it spawned)."""
        async with self._restart_lock:
            self.state = KernelState.RESTARTING
            self._running.clear()
            self._fire("restarting", reason)
            start = time.perf_counter()
            try:
                await self.start()
            except VmcellError as exc:
                self.state = KernelState.DEAD
                self.last_death = f"{reason}; restart failed: {exc}"
                self._fire("dead", self.last_death)
                raise
            finally:
                self._running.set()
            self.state = KernelState.RUNNING
            self.restarts += 1
            log.info("%s: kernel restarted in %.0f ms (%s)", self.agent.link.name,
                     (time.perf_counter() - start) * 1000, reason)
            self._fire("restarted")

    def _on_agent_event(self, event: ControlEvent) -> None:
        if event.name == MEMORY_LIMIT:
            memory = MemoryEvent.parse(event.fields)
            if memory is not None and memory.memory_max is not None:
                self.memory_max, self.memory_high = memory.memory_max, memory.memory_high
            return
        if event.name != KERNEL_DIED or self.state == KernelState.RESTARTING:
            return  # during a restart the old kernel's end is expected news
        code = event.fields.get("returncode")
        oom = event.fields.get("oom_killed") is True
        self.last_death_oom = oom
        if oom:
            self.oom_kills += 1
            limit = byte_count(event.fields.get("memory_max")) or self.memory_max
            self.last_death = ("the kernel was killed by the guest's OOM killer: it reached its memory limit"
                               f"{f' of {limit / 2**20:.0f} MiB' if limit else ''} (status {code})")
        else:
            self.last_death = f"the kernel exited (status {code if isinstance(code, int) else '?'})"
        self.execution_state = "dead"
        self._fire("dead", self.last_death)
        self._running.clear()
        self.state = KernelState.RESTARTING
        self._restart_task = asyncio.create_task(self._restart_after_death())

    async def _restart_after_death(self) -> None:
        try:
            await self.restart(self.last_death or "the kernel died")
        except VmcellError as exc:
            log.warning("%s: the kernel could not be restarted: %s", self.agent.link.name, exc)

    def close(self) -> None:
        """The session is gone: nobody waits for a kernel any more."""
        self.state = KernelState.DEAD
        self.last_death = self.last_death or "the session ended"
        self._running.set()
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()
