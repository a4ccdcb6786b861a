"""Directory watches in the guest (the host end of vmcell_guest/watch.py): `WatchRunner.watch`
yields a `FilesEvent` per change until the caller stops listening (then the guest's watch ends).
The guest's `files_event` events are routed by the watch's id (the host's); ill-shaped ones are
dropped, and a link that closes ends every watch's stream with its failure."""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from dataclasses import dataclass
from typing import AsyncIterator

from vmcell_guest.ops import Event, Op

from .agent import AgentClient
from .link import ControlEvent

log = logging.getLogger("vmcell.watch")
TYPES = ("create", "write", "remove", "rename", "chmod", "overflow")
MAX_NAME_CHARS = 4096
MAX_PENDING = 10_000  # events queued for a slow client; past it they are dropped and an overflow says so


@dataclass(frozen=True)
class WatchStarted:
    path: str  # the watched directory, as the guest resolved it


@dataclass(frozen=True)
class FilesEvent:
    name: str  # relative to the watched directory
    type: str  # create, write, remove, rename, chmod; overflow: events were lost


class WatchRunner:
    _runners: "weakref.WeakKeyDictionary[AgentClient, WatchRunner]" = weakref.WeakKeyDictionary()

    def __init__(self, agent: AgentClient):
        self.agent = agent
        self._queues: dict[str, asyncio.Queue] = {}
        agent.on_event(self._on_event)
        agent.link.add_close_callback(lambda failure: [q.put_nowait(failure) for q in self._queues.values()])

    @classmethod
    def of(cls, agent: AgentClient) -> "WatchRunner":
        runner = cls._runners.get(agent)
        if runner is None:
            runner = cls._runners[agent] = cls(agent)
        return runner

    async def watch(self, path: str, recursive: bool = False) -> AsyncIterator[WatchStarted | FilesEvent]:
        """First WatchStarted once the guest watches (no change after it is missed), then the changes."""
        watch_id = secrets.token_hex(8)
        queue = self._queues[watch_id] = asyncio.Queue()
        try:
            reply = await self.agent.call(Op.files_watch, {"id": watch_id, "path": path, "recursive": recursive})
            yield WatchStarted(str(reply.get("path", path))[:MAX_NAME_CHARS])
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._queues.pop(watch_id, None)
            if not self.agent.link.closed:
                try:
                    await asyncio.shield(self.agent.call(Op.files_unwatch, {"id": watch_id}, timeout=10))
                except Exception as exc:
                    log.debug("ending watch %s: %r", watch_id, exc)

    def _on_event(self, event: ControlEvent) -> None:
        if event.name != Event.files_event.value:
            return
        fields = event.fields
        queue = self._queues.get(fields.get("id")) if isinstance(fields.get("id"), str) else None
        if queue is None:
            return
        name, kind = fields.get("name"), fields.get("type")
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or kind not in TYPES:
            log.warning("dropped an ill-shaped files_event from the guest")
            return
        if queue.qsize() >= MAX_PENDING:
            return
        queue.put_nowait(FilesEvent(name, kind) if queue.qsize() < MAX_PENDING - 1 else FilesEvent("", "overflow"))
