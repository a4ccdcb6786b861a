"""A Jupyter kernel client over the guest link: cells in, structured results (and events) out.

Every outgoing message is signed with the kernel's key by jupyter_client.Session and gets a fresh
msg_id. Incoming messages are untrusted: signature, JSON shape and sizes are checked, and anything
malformed fails the link with GuestProtocolError. One cell runs at a time per kernel; callers wait
their turn in order, and a bounded queue turns away the excess.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from jupyter_client.session import Session as JupyterSession

from vmcell_guest.wire import Channel, Frame, ProtocolError, decode_multipart, encode_multipart

from ..config import CELL_QUEUE_LIMIT, INTERRUPT_GRACE_S, KERNEL_READY_TIMEOUT_S, OUTPUT_CAP_BYTES
from ..errors import CellQueueFull, KernelNotReady
from .link import ControlEvent, GuestLink
from .results import ExecutionError, ExecutionResult, OutputEvent, Result, strip_ansi

log = logging.getLogger("vmcell.kernel")

EventCallback = Callable[[OutputEvent], None]


@dataclass
class _Cell:
    msg_id: str
    output_cap: int
    on_event: EventCallback | None
    silent: bool = False
    result: ExecutionResult = field(default_factory=ExecutionResult)
    replied: bool = False
    timed_out: bool = False
    idle: bool = False
    output_bytes: int = 0
    busy_at: float | None = None  # guest clock (header dates): their difference is guest time
    idle_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, event: OutputEvent) -> None:
        if self.on_event is not None and not self.silent:
            self.on_event(event)

    def admit(self, size: int) -> bool:
        """Output past the cap is dropped (and the result says so): host memory stays bounded."""
        self.output_bytes += size
        if self.output_bytes > self.output_cap:
            self.result.truncated = True
            return False
        return True

    def finish_if_complete(self) -> None:
        if self.replied and self.idle:
            self.done.set()


def _size(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    return 16


class KernelClient:
    def __init__(self, link: GuestLink, key: bytes, output_cap: int = OUTPUT_CAP_BYTES,
                 queue_limit: int = CELL_QUEUE_LIMIT, preload: list[str] | tuple[str, ...] = ()):
        self.link = link
        self.key = key
        self.preload = list(preload)  # the template's: modules the guest's fork server imports
        self.session = JupyterSession(key=key, signature_scheme="hmac-sha256", username="vmcell")
        self.output_cap = output_cap
        self.queue_limit = queue_limit
        self.session_env: dict[str, str] = {}
        # Settings the next cell carries before its own (the post-restore reseed, the session env):
        # applied by the guest extension before any user code runs, without a round trip of their own.
        self.pending_settings: dict = {}
        self.dead_returncode: int | None = None
        self._cell: _Cell | None = None
        self._replies: dict[str, asyncio.Future] = {}
        self._turn_lock = asyncio.Lock()
        self._queued = 0
        # Gateway websockets (and anything else that wants every message): f(channel, msg, raw_parts)
        # where raw_parts are the signed frames after the signature (header, parent, metadata, content, buffers).
        self.listeners: list[Callable[[Channel, dict, list[bytes]], None]] = []
        self.execution_state = "idle"
        self.last_activity = time.time()
        link.on_channel_frame = self._on_frame
        link.on_event = self._on_event

    # ---- incoming ---------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        parts = decode_multipart(frame.body)
        try:
            _, msg_list = self.session.feed_identities(parts, copy=True)
            msg = self.session.deserialize(msg_list, content=True, copy=True)
            msg_type = msg["header"]["msg_type"]
            parent_id = msg["parent_header"].get("msg_id")
            content = msg["content"]
        except Exception as exc:  # bad signature, JSON, or shape: all the guest's fault
            raise ProtocolError(f"invalid Jupyter message on {frame.channel.name}: {exc!r}") from None
        if not isinstance(msg_type, str) or not isinstance(content, dict):
            raise ProtocolError(f"invalid Jupyter message on {frame.channel.name}: bad header or content")
        self.last_activity = time.time()
        if msg_type == "status" and frame.channel == Channel.IOPUB and isinstance(content.get("execution_state"), str):
            self.execution_state = content["execution_state"]
        for listener in list(self.listeners):
            listener(frame.channel, msg, msg_list[1:])
        cell = self._cell
        if cell is not None and parent_id == cell.msg_id:
            self._handle_cell_message(cell, frame.channel, msg_type, msg, content)
        elif parent_id in self._replies and frame.channel in (Channel.SHELL, Channel.KCONTROL):
            fut = self._replies.pop(parent_id)
            if not fut.done():
                fut.set_result(msg)
        # Anything else belongs to a cell we stopped waiting for: dropped.

    def _handle_cell_message(self, cell: _Cell, channel: Channel, msg_type: str, msg: dict, content: dict) -> None:
        result = cell.result
        if channel == Channel.SHELL and msg_type == "execute_reply":
            cell.replied = True
            if isinstance(content.get("execution_count"), int) and not cell.silent:
                result.execution_count = content["execution_count"]
            if content.get("status") == "error" and result.error is None and not cell.timed_out:
                result.error = ExecutionError(str(content.get("ename", "")), str(content.get("evalue", "")),
                                              [strip_ansi(str(t)) for t in content.get("traceback", [])])
            cell.finish_if_complete()
            return
        if channel != Channel.IOPUB:
            return
        if msg_type == "status":
            state = content.get("execution_state")
            date = msg["header"].get("date")
            stamp = date.timestamp() if hasattr(date, "timestamp") else None
            if state == "busy":
                cell.busy_at = stamp
            elif state == "idle":
                cell.idle_at = stamp
                cell.idle = True
                cell.finish_if_complete()
        elif msg_type == "stream":
            name, text = content.get("name"), content.get("text")
            if name in ("stdout", "stderr") and isinstance(text, str) and cell.admit(len(text)):
                getattr(result.logs, name).append(text)
                cell.emit(OutputEvent(name, text))
        elif msg_type == "execute_input":
            if isinstance(content.get("execution_count"), int) and not cell.silent:
                result.execution_count = content["execution_count"]
                cell.emit(OutputEvent("execution_count", result.execution_count))
        elif msg_type in ("execute_result", "display_data", "update_display_data"):
            bundle = content.get("data")
            if isinstance(bundle, dict) and cell.admit(_size(bundle)):
                item = Result.from_bundle(bundle, is_main_result=msg_type == "execute_result")
                result.results.append(item)
                cell.emit(OutputEvent("result", item))
        elif msg_type == "error" and not cell.timed_out:  # a timeout's KeyboardInterrupt is ours, not the user's
            error = ExecutionError(str(content.get("ename", "")), str(content.get("evalue", "")),
                                   [strip_ansi(str(t)) for t in content.get("traceback", [])][:500])
            result.error = error
            cell.emit(OutputEvent("error", error))

    def _on_event(self, event: ControlEvent) -> None:
        if event.name == "kernel_died":
            code = event.fields.get("returncode")
            self.dead_returncode = code if isinstance(code, int) else -1
            cell = self._cell
            if cell is not None and not cell.done.is_set():
                cell.result.error = self._died_error()
                cell.emit(OutputEvent("error", cell.result.error))
                cell.done.set()
        elif event.name == "dropped" and self._cell is not None:
            self._cell.result.truncated = True

    def _died_error(self) -> ExecutionError:
        return ExecutionError("KernelDied", f"the kernel exited (status {self.dead_returncode}); "
                              "restart the session's kernel to continue", [])

    # ---- outgoing ---------------------------------------------------------------------------

    async def _send(self, channel: Channel, msg: dict) -> None:
        parts = self.session.serialize(msg)
        await self.link.send_frame(encode_multipart(channel, parts))

    async def forward(self, channel: Channel, parts: list[bytes]) -> None:
        """Sends a client's message (header, parent, metadata, content, buffers as bytes) to the
        kernel, signed here with the kernel's key: clients never hold it."""
        signature = self.session.sign(parts[:4])
        await self.link.send_frame(encode_multipart(channel, [b"<IDS|MSG>", signature, *parts]))

    async def request(self, channel: Channel, msg_type: str, content: dict, timeout: float) -> dict:
        msg = self.session.msg(msg_type, content)  # a fresh msg_id every time
        fut = asyncio.get_running_loop().create_future()
        self._replies[msg["header"]["msg_id"]] = fut
        try:
            await self._send(channel, msg)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(msg["header"]["msg_id"], None)

    async def wait_ready(self, timeout: float = KERNEL_READY_TIMEOUT_S) -> dict:
        """kernel_info until the kernel answers: it may still be starting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await self.request(Channel.SHELL, "kernel_info_request", {}, timeout=1.0)
                return reply["content"]
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise KernelNotReady(f"the kernel did not answer kernel_info within {timeout:g}s") from None

    async def start(self, env: dict[str, str] | None = None) -> None:
        """(Re)starts the guest kernel with our key and waits until it answers. The template's
        `preload` list goes along every time: the guest's fork server imports what it lacks before
        forking (all of it on a template build's first start, or after an agent restart: cold
        imports under TCG, hence the timeout); in a restored session it has them all already."""
        args = {"key": self.key.decode(), "env": env or {}}
        if self.preload:
            args["preload"] = self.preload
        await self.link.request("kernel_start", args, timeout=300 if self.preload else 60)
        self.dead_returncode = None
        await self.wait_ready()

    async def interrupt(self) -> None:
        await self.link.request("kernel_interrupt", timeout=10)

    def after_restore(self, session_env: dict[str, str]) -> None:
        """A snapshot clone: its RNG state is every sibling's, so the first cell reseeds first."""
        self.session_env = dict(session_env)
        self.pending_settings = {"reseed": True, "session_env": self.session_env}

    async def restart(self) -> None:
        """A fresh kernel process: variables are gone; the session's env is applied again."""
        async with self._turn():
            await self.start()
            self.pending_settings = {"session_env": self.session_env} if self.session_env else {}

    @property
    def busy(self) -> bool:
        """A cell is running or waiting: the session is in use, whatever its idle clock says."""
        return self._queued > 0

    # ---- cells ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _turn(self):
        if self._queued >= self.queue_limit:
            raise CellQueueFull(f"{self._queued} cells are already waiting for this kernel (limit {self.queue_limit})")
        self._queued += 1
        try:
            async with self._turn_lock:
                yield
        finally:
            self._queued -= 1

    async def execute(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None,
                      on_event: EventCallback | None = None) -> ExecutionResult:
        """Runs one user cell. `env` applies to this cell only, as data (never spliced into code)."""
        async with self._turn():
            settings = {"output_cap": self.output_cap, **({"env": env} if env else {})}
            return await self._run_cell(code, settings, silent=False, timeout=timeout, on_event=on_event)

    async def stream(self, code: str, timeout: float | None = None,
                     env: dict[str, str] | None = None) -> AsyncIterator[OutputEvent]:
        """The same cell as a stream of events, ending with an `end` event. Closing the stream
        early (a client that went away) interrupts the cell."""
        queue: asyncio.Queue[OutputEvent] = asyncio.Queue()
        task = asyncio.create_task(self.execute(code, timeout, env, on_event=queue.put_nowait))
        try:
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            result = task.result()
            yield OutputEvent("end", {"execution_count": result.execution_count, "duration_ms": round(result.duration_ms, 2),
                                      "truncated": result.truncated, "error": result.error is not None})
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    async def run_internal(self, code: str = "pass", settings: dict | None = None, timeout: float = 60) -> ExecutionResult:
        """A silent setup cell: no execution count, no history, no events."""
        async with self._turn():
            return await self._run_cell(code, settings or {}, silent=True, timeout=timeout)

    async def _run_cell(self, code: str, settings: dict, silent: bool, timeout: float | None,
                        on_event: EventCallback | None = None) -> ExecutionResult:
        if self.dead_returncode is not None:
            result = ExecutionResult(error=self._died_error())
            if on_event:
                on_event(OutputEvent("error", result.error))
            return result
        if self.pending_settings:
            settings = {**self.pending_settings, **settings}
            self.pending_settings = {}
        msg = self.session.msg("execute_request", {
            "code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True,
        }, metadata={"vmcell": settings} if settings else {})
        cell = _Cell(msg["header"]["msg_id"], self.output_cap, on_event, silent=silent)
        self._cell = cell
        start = time.perf_counter()
        try:
            await self._send(Channel.SHELL, msg)
            try:
                await asyncio.wait_for(self._until_done(cell), timeout)
            except asyncio.TimeoutError:
                cell.timed_out = True
                await self._interrupt_cell(cell)
                cell.result.error = ExecutionError(
                    "CellTimeout", f"the cell ran longer than its {timeout:g}s timeout and was interrupted; "
                    "the kernel and its variables are intact", [])
                cell.emit(OutputEvent("error", cell.result.error))
        except asyncio.CancelledError:
            # The caller went away mid-cell: stop the cell so the kernel is free for the next one.
            if not cell.done.is_set() and not self.link.closed:
                await asyncio.shield(self._interrupt_cell(cell))
            raise
        finally:
            cell.result.duration_ms = (time.perf_counter() - start) * 1000
            if cell.busy_at is not None and cell.idle_at is not None:
                cell.result.guest_ms = (cell.idle_at - cell.busy_at) * 1000
            if self._cell is cell:
                self._cell = None
        if self.link.failure is not None and not cell.done.is_set():
            raise self.link.failure
        return cell.result

    async def _until_done(self, cell: _Cell) -> None:
        """The cell's end, or the link's: a dead link must not leave a caller waiting forever."""
        waiters = [asyncio.ensure_future(cell.done.wait()), asyncio.ensure_future(self.link.closed_event.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _interrupt_cell(self, cell: _Cell) -> None:
        try:
            await self.interrupt()
            await asyncio.wait_for(self._until_done(cell), INTERRUPT_GRACE_S)
        except (asyncio.TimeoutError, Exception) as exc:  # the cell stays abandoned; its late messages are dropped
            log.warning("cell %s did not stop after an interrupt: %r", cell.msg_id, exc)
