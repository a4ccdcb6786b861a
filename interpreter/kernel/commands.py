"""Shell commands in the guest with their output streamed (the host end of vmcell_guest/commands.py).

`CommandRunner.run` starts a command and yields its events as they come: `CommandStarted`,
`CommandOutput` (stdout/stderr text) and last `CommandExit`. The guest's `command_output` and
`command_exit` events are routed here by the command's id, which the host picks. They are claims
of an untrusted guest: ill-shaped ones are dropped (logged), text past OUTPUT_CAP_BYTES per stream
is dropped here too (the exit then lists the stream in `truncated`), and a link that closes ends
every running command's stream with the link's failure.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..config import OUTPUT_CAP_BYTES
from .agent import COMMAND_EXIT, COMMAND_OUTPUT, AgentClient
from .link import ControlEvent

log = logging.getLogger("vmcell.commands")
MAX_CHUNK_CHARS = 256 * 1024  # the guest sends at most 64 KiB of bytes per event
MAX_ERROR_CHARS = 1_000
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class CommandStarted:
    id: str
    pid: int


@dataclass(frozen=True)
class CommandOutput:
    stream: str  # stdout | stderr
    data: str


@dataclass(frozen=True)
class CommandExit:
    exit_code: int
    error: str | None = None
    timed_out: bool = False
    truncated: tuple[str, ...] = field(default=())


class _Running:
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sizes = dict.fromkeys(STREAMS, 0)
        self.truncated: set[str] = set()


class CommandRunner:
    """The commands of one guest (one per AgentClient: `CommandRunner.of(agent)`)."""

    _runners: "weakref.WeakKeyDictionary[AgentClient, CommandRunner]" = weakref.WeakKeyDictionary()

    def __init__(self, agent: AgentClient):
        self.agent = agent
        self._running: dict[str, _Running] = {}
        agent.on_event(self._on_event)
        agent.link.add_close_callback(self._on_link_closed)

    @classmethod
    def of(cls, agent: AgentClient) -> "CommandRunner":
        runner = cls._runners.get(agent)
        if runner is None:
            runner = cls._runners[agent] = cls(agent)
        return runner

    async def run(self, cmd: str, envs: dict[str, str] | None = None, cwd: str | None = None,
                  timeout: float | None = None) -> AsyncIterator[CommandStarted | CommandOutput | CommandExit]:
        """Starts `cmd` and yields its events until its exit. Leaving early kills the command."""
        command_id = secrets.token_hex(8)
        running = self._running[command_id] = _Running()
        finished = False
        try:
            pid = await self.agent.command_start(command_id, cmd, envs or {}, cwd, timeout)
            yield CommandStarted(command_id, pid)
            while True:
                item = await running.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, CommandExit):
                    finished = True
                    yield CommandExit(item.exit_code, item.error, item.timed_out,
                                      tuple(sorted(set(item.truncated) | running.truncated)))
                    return
                yield item
        finally:
            self._running.pop(command_id, None)
            if not finished and not self.agent.link.closed:
                try:
                    await asyncio.shield(self.agent.command_kill(command_id))
                except Exception as exc:  # the guest may be gone, or the command just ended
                    log.debug("killing command %s: %r", command_id, exc)

    async def kill(self, command_id: str) -> bool:
        return command_id in self._running and await self.agent.command_kill(command_id)

    def _on_event(self, event: ControlEvent) -> None:
        if event.name not in (COMMAND_OUTPUT, COMMAND_EXIT):
            return
        fields = event.fields
        running = self._running.get(fields.get("id")) if isinstance(fields.get("id"), str) else None
        if running is None:
            return  # a command we stopped waiting for (or never started)
        if event.name == COMMAND_OUTPUT:
            stream, data = fields.get("stream"), fields.get("data")
            if stream not in STREAMS or not isinstance(data, str) or len(data) > MAX_CHUNK_CHARS:
                log.warning("dropped an ill-shaped command_output event from the guest")
                return
            room = OUTPUT_CAP_BYTES - running.sizes[stream]
            if room <= 0:
                running.truncated.add(stream)
                return
            if len(data) > room:
                data = data[:room]
                running.truncated.add(stream)
            running.sizes[stream] += len(data)
            running.queue.put_nowait(CommandOutput(stream, data))
            return
        code, error, truncated = fields.get("exit_code"), fields.get("error"), fields.get("truncated") or []
        if not isinstance(code, int) or isinstance(code, bool) or not -256 < code < 256:
            code = -1
        if not (error is None or isinstance(error, str)):
            error = "the guest sent an ill-shaped exit"
        truncated = tuple(s for s in truncated if s in STREAMS) if isinstance(truncated, list) else ()
        running.queue.put_nowait(CommandExit(code, error[:MAX_ERROR_CHARS] if error else None,
                                             fields.get("timed_out") is True, truncated))

    def _on_link_closed(self, failure: Exception) -> None:
        for running in self._running.values():
            running.queue.put_nowait(failure)
