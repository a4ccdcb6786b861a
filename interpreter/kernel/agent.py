"""The host's client of the guest agent: one typed method per operation of the guest's table
(vmcell_guest.ops), the agent's error kinds mapped to typed errors (and so to HTTP statuses).

Nothing else on the host names an agent operation: sessions, templates and the bench call these.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Callable

from vmcell_guest.ops import ErrorKind, Event, Op
from vmcell_guest.wire import MAX_CONTEXT_SLOT, PROTOCOL_VERSION

from ..errors import (
    GuestBadRequest,
    GuestFileNotFound,
    GuestNoKernel,
    GuestOperationError,
    GuestPermissionDenied,
    GuestProtocolError,
    GuestTimeout,
    GuestTooLarge,
)
from .link import ControlEvent, GuestLink

log = logging.getLogger("vmcell.agent")

ERROR_TYPES: dict[str, type[GuestOperationError]] = {
    ErrorKind.BadRequest: GuestBadRequest,
    ErrorKind.IsADirectory: GuestBadRequest,
    ErrorKind.NotADirectory: GuestBadRequest,
    ErrorKind.NotFound: GuestFileNotFound,
    ErrorKind.PermissionDenied: GuestPermissionDenied,
    ErrorKind.TooLarge: GuestTooLarge,
    ErrorKind.NoKernel: GuestNoKernel,
    # Agents before the op table answered with Python exception names.
    "FileNotFoundError": GuestFileNotFound,
    "IsADirectoryError": GuestBadRequest,
    "NotADirectoryError": GuestBadRequest,
    "PermissionError": GuestPermissionDenied,
}
FILE_OP_TIMEOUT_S = 60.0
# A start with a preload list may import it cold (a template build, or after the agent restarted).
KERNEL_START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    truncated: tuple[str, ...] = ()
    timed_out: bool = False


@dataclass(frozen=True)
class KillReport:
    """What `kernel_kill_children` did: processes killed, and whether the cell hit the pids limit."""

    killed: int
    pids_max_hit: bool


@dataclass(frozen=True)
class MemoryEvent:
    """A `memory_limit` event, checked: the cell `msg_id` was interrupted at the kernel's high-water
    mark (`interrupt`), or one of its processes was OOM-killed and the kernel lived (`oom_kill`).
    Byte counts the guest sent that are not plausible are None."""

    action: str
    msg_id: str | None
    memory_current: int | None
    memory_max: int | None
    memory_high: int | None

    @classmethod
    def parse(cls, fields: dict) -> "MemoryEvent | None":
        """None if the event is ill-shaped (the guest is untrusted: it is then ignored)."""
        action, msg_id = fields.get("action"), fields.get("msg_id")
        if action not in ("interrupt", "oom_kill") or not (msg_id is None or isinstance(msg_id, str) and len(msg_id) <= 256):
            return None
        return cls(action, msg_id, byte_count(fields.get("memory_current")), byte_count(fields.get("memory_max")),
                   byte_count(fields.get("memory_high")))


def byte_count(value) -> int | None:
    """A memory figure from the guest: an int in 0..1 PiB, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**50 else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value, op: Op) -> bytes:
    if not isinstance(value, str):
        raise GuestProtocolError(f"agent op {op.value!r} answered without base64 data")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise GuestProtocolError(f"agent op {op.value!r} answered with invalid base64") from None


class AgentClient:
    def __init__(self, link: GuestLink):
        self.link = link
        self._event_handlers: list[Callable[[ControlEvent], None]] = []
        link.on_event = self._on_event

    def on_event(self, handler: Callable[[ControlEvent], None]) -> None:
        self._event_handlers.append(handler)

    def remove_event_handler(self, handler: Callable[[ControlEvent], None]) -> None:
        if handler in self._event_handlers:
            self._event_handlers.remove(handler)

    def _on_event(self, event: ControlEvent) -> None:
        for handler in list(self._event_handlers):
            try:
                handler(event)
            except Exception:  # one handler's bug must not take the link's reader down
                log.exception("%s: handler of agent event %r failed", self.link.name, event.name)

    async def call(self, op: Op, args: dict | None = None, timeout: float = 30.0, resync: bool = False) -> dict:
        try:
            return await self.link.request(op.value, args, timeout, resync=resync)
        except GuestOperationError as exc:
            kind = ERROR_TYPES.get(exc.kind, GuestOperationError)
            raise kind(exc.op, exc.kind, exc.message) from None

    # ---- the agent's table, in its order ------------------------------------------------------

    async def handshake(self, timeout: float, resend_every: float = 0.25) -> dict:
        """Says hello, after the resync magic, until the agent answers; the answer comes right after
        the guest's sync marker for this link's nonce, before which the link reads nothing (see
        link.py). Resending matters on a cold boot: the guest kernel drops port data that arrives
        before the agent has opened the port; and a resend starts the guest's decoding afresh again
        if a first magic got lost in the tail of a cut frame. Every resend has the same nonce: the
        first marker that arrives syncs the link, the later ones are skipped between frames."""
        deadline = time.monotonic() + timeout
        args = {"version": PROTOCOL_VERSION, "sync": self.link.sync_nonce}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout(f"{self.link.name}: the guest agent did not answer hello within {timeout:g}s")
            try:
                reply = await self.call(Op.hello, args, min(resend_every, remaining), resync=True)
            except GuestTimeout:
                continue
            if reply.get("version") != PROTOCOL_VERSION:
                raise GuestProtocolError(f"{self.link.name}: agent speaks link protocol {reply.get('version')!r}")
            return reply

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the agent, in milliseconds."""
        start = time.perf_counter()
        await self.call(Op.ping, timeout=timeout)
        return (time.perf_counter() - start) * 1000

    async def set_clock(self) -> float:
        """Sets the guest's CLOCK_REALTIME to the host's; returns how far the guest was off, in ms
        (guest minus host, negative: behind). For a VM resumed after a pause: its clock stood still."""
        reply = await self.call(Op.clock, {"time_ns": time.time_ns()}, timeout=10)
        offset = reply.get("offset_ms")
        if not isinstance(offset, (int, float)) or isinstance(offset, bool):
            raise GuestProtocolError(f"{self.link.name}: agent op 'clock' answered without a numeric offset_ms")
        return float(offset)

    async def identity(self, entropy: bytes, hostname: str, machine_id: str) -> None:
        await self.call(Op.identity, {"entropy": _b64(entropy), "time_ns": time.time_ns(),
                                      "hostname": hostname, "machine_id": machine_id})

    async def run(self, argv: list[str], timeout: float = 30.0, stdin: bytes = b"") -> RunResult:
        reply = await self.call(Op.run, {"argv": argv, "timeout": timeout, "stdin": _b64(stdin)}, timeout + 10)
        returncode = reply.get("returncode")
        return RunResult(
            returncode=returncode if isinstance(returncode, int) else -1,
            stdout=_unb64(reply.get("stdout", ""), Op.run), stderr=_unb64(reply.get("stderr", ""), Op.run),
            truncated=tuple(str(t) for t in reply.get("truncated") or ()), timed_out=reply.get("timed_out") is True,
        )

    async def sync(self, drop_caches: bool = False) -> None:
        await self.call(Op.sync, {"drop_caches": drop_caches})

    async def files_write(self, path: str, data: bytes) -> dict:
        reply = await self.call(Op.files_write, {"path": path, "data": _b64(data)}, FILE_OP_TIMEOUT_S)
        return {"path": str(reply.get("path", path)), "size": reply.get("size") if isinstance(reply.get("size"), int) else len(data)}

    async def files_read(self, path: str) -> bytes:
        return _unb64((await self.call(Op.files_read, {"path": path}, FILE_OP_TIMEOUT_S)).get("data"), Op.files_read)

    async def files_list(self, path: str) -> list[dict]:
        entries = (await self.call(Op.files_list, {"path": path}, FILE_OP_TIMEOUT_S)).get("entries")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise GuestProtocolError("agent op 'files_list' answered without a list of entries")
        return [{k: e.get(k) for k in ("name", "path", "type", "size")} for e in entries]

    # The kernel ops take `context`: the slot of a code context's kernel (0, the default, is left out
    # of the request: the guest's own default, and the requests of protocol 2).

    async def kernel_start(self, key: bytes, env: dict[str, str], preload: tuple[str, ...] = (),
                           limits: dict | None = None, context: int = 0, language: str | None = None,
                           cwd: str | None = None) -> dict:
        args = {"key": key.decode(), "env": env, "preload": list(preload), "limits": limits or {},
                **_slot(context)}
        if language is not None:
            args["language"] = language
        if cwd is not None:
            args["cwd"] = cwd
        return await self.call(Op.kernel_start, args, KERNEL_START_TIMEOUT_S)

    async def kernel_interrupt(self, context: int = 0) -> bool:
        """SIGINT to the kernel; False when no kernel was alive to receive it."""
        return (await self.call(Op.kernel_interrupt, _slot(context), timeout=10)).get("alive") is True

    async def kernel_kill_children(self, everything: bool = False, context: int = 0) -> KillReport:
        reply = await self.call(Op.kernel_kill_children, {"all": everything, **_slot(context)}, timeout=30)
        killed = reply.get("killed")
        return KillReport(killed if isinstance(killed, int) else 0, reply.get("pids_max_hit") is True)

    async def kernel_stop(self, context: int) -> None:
        """A code context removed: the guest kills its kernel tree and forgets the slot."""
        await self.call(Op.kernel_stop, {"context": context}, timeout=30)

    async def kernel_status(self, context: int = 0) -> dict:
        """The agent's answer as is, but `busy_with` checked: a host that did not send the running
        cell (it restarted) acts on it, and the guest is untrusted."""
        status = await self.call(Op.kernel_status, _slot(context), timeout=10)
        busy = status.get("busy_with")
        if busy is not None and not (isinstance(busy, dict) and isinstance(busy.get("msg_id"), str)
                                     and isinstance(busy.get("session"), (str, type(None)))):
            raise GuestProtocolError(f"{self.link.name}: kernel_status has an ill-shaped busy_with: {busy!r}")
        return status

    async def egress(self, nonce: str) -> dict:
        """Network for the session: the guest's egress listener, synced with this nonce (network/egress.py)."""
        return await self.call(Op.egress, {"sync": nonce}, timeout=15)

    # ---- the sandbox surface: commands (commands.py routes their events), more file ops, metrics ----

    async def command_start(self, command_id: str, cmd: str, envs: dict[str, str], cwd: str | None,
                            timeout: float | None) -> int:
        reply = await self.call(Op.command_start, {"id": command_id, "cmd": cmd, "envs": envs, "cwd": cwd,
                                                   "timeout": timeout or 0}, timeout=30)
        return _checked(reply.get("pid"), int, Op.command_start, "pid")

    async def command_kill(self, command_id: str) -> bool:
        return (await self.call(Op.command_kill, {"id": command_id}, timeout=10)).get("killed") is True

    async def files_exists(self, path: str) -> bool:
        return _checked((await self.call(Op.files_exists, {"path": path})).get("exists"), bool, Op.files_exists, "exists")

    async def files_remove(self, path: str) -> None:
        await self.call(Op.files_remove, {"path": path}, FILE_OP_TIMEOUT_S)

    async def files_make_dir(self, path: str) -> bool:
        reply = await self.call(Op.files_make_dir, {"path": path})
        return _checked(reply.get("created"), bool, Op.files_make_dir, "created")

    async def files_rename(self, path: str, new_path: str) -> dict:
        entry = await self.call(Op.files_rename, {"path": path, "new_path": new_path}, FILE_OP_TIMEOUT_S)
        for name, kind in (("name", str), ("path", str), ("type", str), ("size", int)):
            _checked(entry.get(name), kind, Op.files_rename, name)
        return {k: entry[k] for k in ("name", "path", "type", "size")}

    async def metrics(self) -> dict:
        """The VM's figures, checked (E2B's SandboxMetrics fields)."""
        reply = await self.call(Op.metrics, timeout=10)
        out = {"cpu_count": _checked(reply.get("cpu_count"), int, Op.metrics, "cpu_count")}
        for name in ("mem_used", "mem_total", "disk_used", "disk_total"):
            value = byte_count(reply.get(name))
            if value is None:
                raise GuestProtocolError(f"agent op 'metrics' answered without a plausible {name}")
            out[name] = value
        for name in ("cpu_used_pct", "timestamp"):
            out[name] = float(_checked(reply.get(name), (int, float), Op.metrics, name))
        out["cpu_used_pct"] = min(max(out["cpu_used_pct"], 0.0), 100.0)
        return out


def _checked(value, kind, op: Op, name: str):
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise GuestProtocolError(f"agent op {op.value!r} answered without a valid {name}")
    return value


def _slot(context: int) -> dict:
    return {"context": context} if context else {}


def event_slot(event: ControlEvent) -> int | None:
    """The slot a kernel event is about (absent: 0); None if the guest sent something else."""
    slot = event.fields.get("context", 0)
    return slot if isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot <= MAX_CONTEXT_SLOT else None


class SlotAgent:
    """The agent as one kernel's lifecycle and cell engine see it: the kernel ops bound to its slot
    (and, for a code context, its language and cwd), and only the events about its kernel."""

    def __init__(self, agent: AgentClient, slot: int = 0, language: str | None = None, cwd: str | None = None):
        self.agent, self.slot, self.language, self.cwd = agent, slot, language, cwd
        self.link = agent.link
        self._handlers: list[Callable[[ControlEvent], None]] = []
        self.closed = False
        agent.on_event(self._on_event)

    def on_event(self, handler: Callable[[ControlEvent], None]) -> None:
        self._handlers.append(handler)

    def _on_event(self, event: ControlEvent) -> None:
        if self.closed or event_slot(event) != self.slot:
            return
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                log.exception("%s: handler of agent event %r failed", self.link.name, event.name)

    def close(self) -> None:
        """A removed context: no more events for it."""
        self.closed = True
        self.agent.remove_event_handler(self._on_event)

    async def kernel_start(self, key: bytes, env: dict[str, str], preload: tuple[str, ...] = (),
                           limits: dict | None = None) -> dict:
        return await self.agent.kernel_start(key, env, preload, limits, self.slot, self.language, self.cwd)

    async def kernel_interrupt(self) -> bool:
        return await self.agent.kernel_interrupt(self.slot)

    async def kernel_kill_children(self, everything: bool = False) -> KillReport:
        return await self.agent.kernel_kill_children(everything, self.slot)

    async def kernel_status(self) -> dict:
        return await self.agent.kernel_status(self.slot)


KERNEL_DIED = Event.kernel_died.value
DROPPED = Event.dropped.value
MEMORY_LIMIT = Event.memory_limit.value
COMMAND_OUTPUT = Event.command_output.value
COMMAND_EXIT = Event.command_exit.value
