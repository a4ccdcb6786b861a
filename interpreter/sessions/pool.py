"""The warm pool: sessions restored ahead of demand, kept paused, handed out on create.

Per template, `size` sessions wait restored and stopped (QMP stop: no CPU). A create takes one:
`cont`, then its identity (entropy, hostname, machine-id, clock) is applied at that moment, not
when it was restored, and its first cell reseeds `random` and NumPy. A pool miss never waits for the
refill: the create restores its own session at once. Refills run one at a time, their QEMUs niced
(background priority) until taken, and only once takes have paused for REFILL_QUIET_S: a burst of
creates is not slowed by refills competing for the cores. A refill runs the identity op and one
silent cell before pausing its VM, so that TCG has translated that guest code in this QEMU process
already: a take costs `cont` plus the identity, and the user's first cell does not pay for
translating the kernel's execute path (docs/performance.md has the figures).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

log = logging.getLogger("vmcell.sessions")

POOL_NICE = 10  # refills yield the CPU to sessions in use
REFILL_RETRY_S = 5.0
REFILL_QUIET_S = 1.0  # a refill starts only once no take has happened for this long
POOL_WARMUP_CELL = "1 + 1"  # silent: no output, no execution count, no metrics
POOL_WARMUP_TIMEOUT_S = 60.0


class WarmPool:
    def __init__(self, manager, sizes: dict[str, int]):
        self._manager = manager
        self.sizes = {name: n for name, n in sizes.items() if n > 0}
        self._ready: dict[str, deque] = {name: deque() for name in self.sizes}
        self._wanted = {name: asyncio.Event() for name in self.sizes}
        self._tasks: list[asyncio.Task] = []
        self._last_take = float("-inf")

    def ready(self, template: str) -> int:
        return len(self._ready.get(template, ()))

    def sessions(self) -> list:
        """Every session waiting in the pool (metrics read their VMs)."""
        return [s for ready in self._ready.values() for s in ready]

    def start(self) -> None:
        for name in self.sizes:
            self._wanted[name].set()
            self._tasks.append(asyncio.ensure_future(self._refill(name)))

    async def take(self, template: str, env: dict[str, str]):
        """A pooled session made the caller's, or None if none is ready."""
        ready = self._ready.get(template)
        if ready is not None:
            self._last_take = time.monotonic()
        while ready:
            session = ready.popleft()
            self._wanted[template].set()
            start = time.perf_counter()
            try:
                await self._manager.adopt_pooled(session, env)
            except Exception as exc:
                log.warning("pooled session %s could not be handed out (%s); trying another", session.id, exc)
                await session.close("it failed when taken from the pool")
                continue
            session.restore_ms = (time.perf_counter() - start) * 1000
            return session
        return None

    async def _refill(self, name: str) -> None:
        while True:
            await self._wanted[name].wait()
            self._wanted[name].clear()
            while len(self._ready[name]) < self.sizes[name]:
                while (quiet_in := self._last_take + REFILL_QUIET_S - time.monotonic()) > 0:
                    await asyncio.sleep(quiet_in)
                try:
                    session = await self._manager.restore_for_pool(name)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("pool refill of %r failed: %s", name, exc)
                    await asyncio.sleep(REFILL_RETRY_S)
                    continue
                self._ready[name].append(session)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sessions = [s for ready in self._ready.values() for s in ready]
        for ready in self._ready.values():
            ready.clear()
        await asyncio.gather(*(s.close("the pool closed") for s in sessions), return_exceptions=True)
