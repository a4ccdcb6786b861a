"""The cell engine: every cell of a session, from every door, goes through here.

REST (JSON and NDJSON), the SDK, `vmcell run` and the gateway's websockets all queue their
execute_requests in one FIFO per kernel. The engine owns what a cell is: its turn, the settings it
carries to the guest (the session's env and post-restore reseed on the first cell, per-cell env,
the output cap), its output (withheld from every consumer past the cap), its timeout, how it is
stopped (SIGINT, then the processes it started, then the kernel), and how it ends:

  reply + idle            the cell finished (its error, if any, is the user's)
  timeout / cancel        interrupted; CellTimeout in the result
  past the memory mark    the guest interrupted it; the KeyboardInterrupt is MemoryLimitExceeded
  the kernel died         KernelDied (the lifecycle restarts the kernel; variables are lost);
                          MemoryLimitExceeded if the OOM killer killed it
  malformed guest reply   GuestProtocolError for that cell; the kernel is interrupted
  the session ended       SessionClosed or VMDied, for the running cell and every queued one
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import orjson

from vmcell_guest.wire import Channel

from ..config import CELL_QUEUE_LIMIT, GATEWAY_QUEUE_LIMIT, INTERRUPT_GRACE_S, KILL_GRACE_S, OUTPUT_CAP_BYTES
from ..errors import CellQueueFull, GuestProtocolError, KernelDied, MemoryLimitExceeded, VmcellError
from .agent import DROPPED, MEMORY_LIMIT, AgentClient, MemoryEvent
from .lifecycle import KernelLifecycle
from .link import ControlEvent
from .results import ExecutionError, ExecutionResult, OutputEvent, Result, strip_ansi
from .router import KernelMessage, MessageRouter

log = logging.getLogger("vmcell.engine")

EventCallback = Callable[[OutputEvent], None]
MAX_TRACEBACK_LINES = 500


def _size(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    return 16


def _error_from(content: dict) -> ExecutionError:
    """An error (iopub `error` or an error execute_reply) as the guest sent it: checked, not trusted."""
    name, value, traceback = content.get("ename"), content.get("evalue"), content.get("traceback", [])
    if not isinstance(name, str) or not isinstance(value, str) or not isinstance(traceback, list) \
            or not all(isinstance(line, str) for line in traceback):
        raise GuestProtocolError("the kernel sent an error with a bad ename/evalue/traceback")
    return ExecutionError(name, value, [strip_ansi(line) for line in traceback[:MAX_TRACEBACK_LINES]])


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.0f}" if value is not None else "?"


# The names a cell's error has when the guest interrupted it at the memory mark: ours (the guest
# extension renders it so for every client) or the bare KeyboardInterrupt (an extension that did not).
_INTERRUPT_NAMES = ("KeyboardInterrupt", "MemoryLimitExceeded")


def memory_error(event: MemoryEvent, error: ExecutionError | None) -> ExecutionError | None:
    """The cell's error once the guest reported its memory (`memory_limit`): MemoryLimitExceeded,
    with the figures the agent measured (checked), the kernel's traceback kept. An interrupt that
    the cell's code turned into another error keeps that error (a note says what happened)."""
    if event.action == "interrupt":
        if error is None or error.name not in _INTERRUPT_NAMES:
            return error
        value = (f"the kernel used {_mib(event.memory_current)} MiB of its {_mib(event.memory_max)} MiB memory limit "
                 f"(high-water mark {_mib(event.memory_high)} MiB); the cell was interrupted and the kernel's "
                 "variables are kept (del big ones to free memory)")
    else:
        value = (f"a process the cell started was killed by the guest's OOM killer: the kernel's processes reached "
                 f"their {_mib(event.memory_max)} MiB memory limit; the kernel and its variables are kept")
        if error is not None and error.name not in _INTERRUPT_NAMES:
            value += f" (the cell's error: {error.name}: {error.value})"
    return ExecutionError("MemoryLimitExceeded", value, error.traceback if error is not None else [])


@dataclass(eq=False)
class Cell:
    msg_id: str
    output_cap: int
    door: str  # "api" (REST, SDK, run, bench) or "gateway" (a websocket client)
    request: dict | list[bytes]  # our execute_request message, or a client's signed-less parts
    timeout: float | None = None
    on_event: EventCallback | None = None
    silent: bool = False
    stop_on_error: bool = True
    client_header: dict | None = None  # a gateway client's request header (its replies' parent)
    result: ExecutionResult = field(default_factory=ExecutionResult)
    sent_at: float | None = None  # host clock, when the request went to the kernel (None: still queued)
    replied: bool = False
    idle: bool = False
    timed_out: bool = False
    fault: BaseException | None = None
    output_bytes: int = 0
    kept_main_result: bool = False
    busy_at: float | None = None  # guest clock (header dates): their difference is guest time
    idle_at: float | None = None
    notes: list[str] = field(default_factory=list)
    memory: MemoryEvent | None = None  # the guest interrupted it at the memory mark, or OOM-killed a process of it
    done: asyncio.Event = field(default_factory=asyncio.Event)  # its caller has its answer
    # The kernel is through with it (reply and idle). Only then may the next request go: ipykernel
    # aborts requests that arrive while an interrupted cell is still unwinding.
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, event: OutputEvent) -> None:
        if self.on_event is not None and not self.silent:
            try:
                self.on_event(event)
            except Exception:  # a caller's callback must not end the cell, nor the reader
                log.exception("cell %s: an output callback failed; it gets no more events", self.msg_id)
                self.on_event = None

    def room(self) -> int:
        return max(0, self.output_cap - self.output_bytes)

    def admit(self, size: int, main_result: bool = False) -> bool:
        """Output past the cap is dropped for everyone (and the result says so): memory stays bounded.
        The cell's main result (its last expression) is kept whatever came before, if it fits the cap
        by itself: a big print must not hide the answer."""
        if main_result and size <= self.output_cap and not self.kept_main_result:
            self.kept_main_result = True
            return True
        self.output_bytes += size
        if self.output_bytes > self.output_cap:
            self.result.truncated = True
            return False
        return True

    def end(self, fault: BaseException | None = None) -> None:
        """The one way a cell ends: everything its caller reads is set before `done`."""
        if self.done.is_set():
            return
        if fault is not None:
            self.fault = fault
            self.result.error = ExecutionError.from_exception(fault)
        elif self.timed_out:  # the KeyboardInterrupt the kernel reported was ours, not the user's
            self.result.error = ExecutionError(
                "CellTimeout", f"the cell ran longer than its {self.timeout:g}s timeout and was interrupted; "
                "the kernel's variables are intact", [])
        memory_late = (fault is None and not self.timed_out and self.memory is not None
                       and self.memory.action == "oom_kill" and self.result.error is None)
        if memory_late:  # one of its processes was OOM-killed and the cell ended without an error
            self.result.error = memory_error(self.memory, None)
        elif fault is None and not self.timed_out and self.memory is not None and self.result.error is not None \
                and self.result.error.name != "MemoryLimitExceeded":
            self._note_memory()
        if self.notes and self.result.error is not None:
            self.result.error.value += f" ({'; '.join(self.notes)})"
        if fault is not None or self.timed_out or memory_late:
            self.emit(OutputEvent("error", self.result.error))
        if self.sent_at is not None:
            self.result.duration_ms = (time.perf_counter() - self.sent_at) * 1000
        if self.busy_at is not None and self.idle_at is not None:
            self.result.guest_ms = (self.idle_at - self.busy_at) * 1000
        self.done.set()

    def _note_memory(self) -> None:
        """The guest interrupted the cell at the memory mark, and its code made another error of it."""
        self.notes.append(f"the kernel's memory reached {_mib(self.memory.memory_current)} MiB of its "
                          f"{_mib(self.memory.memory_max)} MiB limit and the cell was interrupted")

    async def wait(self, timeout: float | None, event: str = "done") -> bool:
        try:
            await asyncio.wait_for(getattr(self, event).wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class CellEngine:
    def __init__(self, router: MessageRouter, lifecycle: KernelLifecycle, agent: AgentClient,
                 output_cap: int = OUTPUT_CAP_BYTES, queue_limit: int = CELL_QUEUE_LIMIT,
                 on_activity: Callable[[], None] | None = None):
        self.router, self.lifecycle, self.agent = router, lifecycle, agent
        self.output_cap, self.queue_limit = output_cap, queue_limit
        self.on_activity = on_activity or (lambda: None)
        self.on_cell_end: Callable[[Cell], None] | None = None  # metrics (interpreter/metrics.py)
        # Settings the next cell carries before its own (the post-restore reseed, the session env):
        # applied by the guest extension before any user code runs, without a round trip of their own.
        self.pending_settings: dict = {}
        self.fault: BaseException | None = None  # set once the session is gone: every cell ends with it
        # Cells the guest interrupted at the kernel's memory mark (a C call that went on to the OOM
        # killer included: it was interrupted first).
        self.memory_interrupts = 0
        self._queue: deque[Cell] = deque()
        self._wakeup = asyncio.Event()
        self._current: Cell | None = None
        self._background: set[asyncio.Task] = set()  # held here: the loop keeps only weak references
        router.owner = self._on_message
        agent.on_event(self._on_agent_event)
        lifecycle.on("dead", self._on_kernel_dead)
        lifecycle.on("restarting", self._on_kernel_restarting)
        self._worker = asyncio.create_task(self._work(), name=f"cells-{router.link.name}")

    # ---- state ------------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def busy(self) -> bool:
        """A cell is running or waiting: the session is in use, whatever its idle clock says."""
        return self._current is not None or bool(self._queue)

    def queued(self, door: str) -> int:
        return sum(c.door == door for c in self._queue) + (self._current is not None and self._current.door == door)

    def after_restore(self, session_env: dict[str, str]) -> None:
        """A snapshot clone: its RNG state is every sibling's, and its process env is the template's,
        so the first cell, whichever door it comes from, reseeds and applies the session env first."""
        self.pending_settings = {"reseed": True, **({"session_env": session_env} if session_env else {})}

    # ---- doors ------------------------------------------------------------------------------

    async def execute(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None,
                      on_event: EventCallback | None = None, silent: bool = False) -> ExecutionResult:
        """One cell. `env` applies to this cell only, as data (never spliced into code). Returns the
        result (a KernelDied fault included, with what the cell printed before); raises if the
        session is gone (SessionClosed, VMDied) or the guest broke the protocol."""
        settings = {"output_cap": self.output_cap, **({"env": env} if env else {})}
        msg = self.router.new_message("execute_request", {
            "code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}, metadata={"vmcell": settings})
        cell = Cell(msg["header"]["msg_id"], self.output_cap, "api", msg, timeout=timeout, on_event=on_event,
                    silent=silent)
        self._enqueue(cell, self.queue_limit)
        try:
            await cell.done.wait()
        except asyncio.CancelledError:
            # The caller went away: a queued cell never runs; a running one is stopped so the kernel is
            # free for the next (the worker does that, and carries on).
            if cell in self._queue:
                self._queue.remove(cell)
            elif cell.sent_at is not None and not cell.done.is_set():
                self._spawn(self._stop(cell, "the caller went away"))
            raise
        if cell.fault is not None and not isinstance(cell.fault, KernelDied):
            raise cell.fault
        return cell.result

    async def stream(self, code: str, timeout: float | None = None,
                     env: dict[str, str] | None = None) -> AsyncIterator[OutputEvent]:
        """The same cell as events. The last is `end`, or an `error` event with `fault` set when the
        cell did not end by itself. Closing the stream early (a client that went away) stops the cell."""
        queue: asyncio.Queue[OutputEvent] = asyncio.Queue()
        task = asyncio.ensure_future(self.execute(code, timeout, env, on_event=queue.put_nowait))
        try:
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    event = getter.result()
                    yield event
                    if event.type == "error" and event.data.fault:
                        return
                else:
                    getter.cancel()
            result = task.result()  # faults were yielded above as their error event
            yield OutputEvent("end", {"execution_count": result.execution_count, "duration_ms": round(result.duration_ms, 2),
                                      "truncated": result.truncated, "error": result.error is not None})
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def submit_client_message(self, channel: Channel, parts: list[bytes]) -> None:
        """A gateway client's message (header, parent, metadata, content, buffers). execute_requests
        take their turn with every other cell; everything else goes to the kernel at once."""
        if self.fault is not None:
            raise self.fault
        try:
            header = orjson.loads(parts[0])
        except orjson.JSONDecodeError:
            header = None
        header = header if isinstance(header, dict) else {}
        if channel == Channel.SHELL and header.get("msg_type") == "execute_request" and isinstance(header.get("msg_id"), str):
            cell = Cell(header["msg_id"], self.output_cap, "gateway", parts, client_header=header)
            try:
                cell.stop_on_error = orjson.loads(parts[3]).get("stop_on_error", True) is not False
            except (orjson.JSONDecodeError, AttributeError):
                pass
            try:
                self._enqueue(cell, GATEWAY_QUEUE_LIMIT)
            except CellQueueFull as exc:
                self._answer_for_kernel(cell, exc)
            return
        self.on_activity()
        await self.router.forward(channel, parts)

    # ---- stopping cells ---------------------------------------------------------------------

    async def interrupt(self) -> None:
        """Interrupts the running cell, escalating if it does not stop (see _stop); with no cell
        running it is a plain SIGINT, as Jupyter's interrupt is."""
        cell = self._current
        if cell is None:
            await self.agent.kernel_interrupt()
            return
        await self._stop(cell, "interrupted")

    async def _stop(self, cell: Cell, why: str, reap: bool = False) -> None:
        """SIGINT; then the processes the cell started; then the kernel itself. Each step only if the
        kernel is still running the cell after the one before. With `reap` (a timeout: vmcell ended
        the cell, nobody will look after what it left running), what it started is killed anyway."""
        try:
            await self.agent.kernel_interrupt()
            if await cell.wait(INTERRUPT_GRACE_S, "settled"):
                if reap:
                    await self._kill_leftovers(cell)
                return
            report = await self.agent.kernel_kill_children()
            log.warning("cell %s (%s) ignored SIGINT: killed %d processes it started", cell.msg_id, why, report.killed)
            self._note(cell, f"it ignored the interrupt; {report.killed} processes it started were killed")
            if await cell.wait(KILL_GRACE_S, "settled"):
                return
            log.warning("cell %s still running: restarting the kernel", cell.msg_id)
            cell.end(KernelDied(f"the cell was {why} and did not stop, even after the processes it started were "
                                "killed; the kernel was restarted and its variables are lost"))
            await self.lifecycle.restart("a cell did not stop")
        except VmcellError as exc:
            if not cell.done.is_set() and self.fault is None:
                log.warning("stopping cell %s failed: %s", cell.msg_id, exc)

    @staticmethod
    def _note(cell: Cell, note: str) -> None:
        """Said in the cell's error, whichever it ends with: what vmcell had to do to stop it."""
        cell.notes.append(note)

    # ---- the worker -------------------------------------------------------------------------

    def _enqueue(self, cell: Cell, limit: int) -> None:
        if self.fault is not None:
            raise self.fault
        waiting = self.queued(cell.door)
        if waiting >= limit:
            raise CellQueueFull(f"{waiting} cells are already waiting for this kernel (limit {limit})")
        self._queue.append(cell)
        self._wakeup.set()

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            cell = self._queue.popleft()
            try:
                await self.lifecycle.running()
                self._current = cell
                await self._run(cell)
            except asyncio.CancelledError:
                cell.end(self.fault or asyncio.CancelledError())
                raise
            except VmcellError as exc:
                cell.end(self.fault or exc)
            except Exception as exc:  # our bug: the cell still gets an answer, the worker lives on
                log.exception("cell %s failed", cell.msg_id)
                cell.end(GuestProtocolError(f"the cell could not be run: {exc!r}"))
            finally:
                self._current = None
                self.on_activity()
                if self.on_cell_end is not None:
                    try:
                        self.on_cell_end(cell)
                    except Exception:  # a metrics bug must not stop the worker
                        log.exception("cell %s: the cell-end hook failed", cell.msg_id)
                if cell.door == "gateway" and cell.fault is not None:
                    self._answer_for_kernel(cell, cell.fault)
                elif cell.door == "gateway" and cell.result.error is not None and cell.stop_on_error:
                    self._abort_queued_client_cells()

    async def _run(self, cell: Cell) -> None:
        settings = {"output_cap": cell.output_cap, **self.pending_settings}
        self.pending_settings = {}
        self.on_activity()
        cell.sent_at = time.perf_counter()
        if isinstance(cell.request, dict):
            cell.request["metadata"]["vmcell"] = {**settings, **cell.request["metadata"]["vmcell"]}
            await self.router.send(Channel.SHELL, cell.request)
        else:
            parts = list(cell.request)
            metadata = orjson.loads(parts[2]) if parts[2] else {}
            parts[2] = orjson.dumps({**(metadata if isinstance(metadata, dict) else {}), "vmcell": settings})
            await self.router.forward(Channel.SHELL, parts)
        if not await cell.wait(cell.timeout):
            cell.timed_out = True
            await self._stop(cell, "past its timeout", reap=True)
            cell.end()  # if stopping it failed, it still ends here, as timed out
        elif isinstance(cell.fault, GuestProtocolError) and not cell.settled.is_set():
            await self._stop(cell, "answered with a malformed message")  # the kernel may still run it

    def _abort_queued_client_cells(self) -> None:
        """What ipykernel does after an error with stop_on_error (a notebook's "run all" stops at the
        failing cell): every execute_request waiting behind it gets an `aborted` reply. Only the
        gateway's cells: an API caller's cell is its own request and runs."""
        aborted = [c for c in self._queue if c.door == "gateway"]
        for cell in aborted:
            self._queue.remove(cell)
            self._reply_for_kernel(cell, {"status": "aborted", "execution_count": None})
            cell.end()

    def _answer_for_kernel(self, cell: Cell, fault: BaseException) -> None:
        error = {"ename": type(fault).__name__, "evalue": str(fault), "traceback": []}
        self._reply_for_kernel(cell, {"status": "error", **error, "execution_count": None}, error)

    def _reply_for_kernel(self, cell: Cell, reply: dict, error: dict | None = None) -> None:
        """A gateway client waits for an execute_reply and an idle status the kernel will never send
        (the cell never reached it, or it is gone): busy, [error], reply, idle, as ipykernel does."""
        self.router.publish(Channel.IOPUB, "status", {"execution_state": "busy"}, cell.client_header)
        if error is not None:
            self.router.publish(Channel.IOPUB, "error", error, cell.client_header)
        self.router.publish(Channel.SHELL, "execute_reply", reply, cell.client_header)
        self.router.publish(Channel.IOPUB, "status", {"execution_state": "idle"}, cell.client_header)

    # ---- what the kernel sends --------------------------------------------------------------

    def _on_message(self, message: KernelMessage) -> bool:
        """The router's owner hook: True lets the message go on to the subscribers."""
        cell = self._current
        if cell is None or message.parent_id != cell.msg_id:
            return True
        if cell.done.is_set():  # a cell that ended early (a fault): the kernel may still be unwinding it
            if message.msg_type in ("execute_reply", "status"):
                cell.replied |= message.msg_type == "execute_reply"
                cell.idle |= message.content.get("execution_state") == "idle"
                if cell.replied and cell.idle:
                    cell.settled.set()
            return not cell.result.truncated
        try:
            return self._handle(cell, message)
        except GuestProtocolError as exc:
            log.warning("cell %s: %s", cell.msg_id, exc)
            cell.end(exc)
            return False

    def _handle(self, cell: Cell, message: KernelMessage) -> bool:
        result, content, msg_type = cell.result, message.content, message.msg_type
        if message.channel == Channel.SHELL and msg_type == "execute_reply":
            cell.replied = True
            count = content.get("execution_count")
            if isinstance(count, int) and not cell.silent:
                result.execution_count = count
            status = content.get("status")
            if status == "error" and result.error is None and not cell.timed_out:
                result.error = self._memory_checked(cell, _error_from(content))
                cell.emit(OutputEvent("error", result.error))  # stream consumers see it too
            elif status == "aborted" and result.error is None:
                result.error = ExecutionError("CellAborted", "the kernel skipped this cell (an earlier one failed)", [])
                cell.emit(OutputEvent("error", result.error))
            if cell.idle:
                self._settle(cell)
            return True
        if message.channel != Channel.IOPUB:
            return True
        if msg_type == "status":
            state = content.get("execution_state")
            date = message.msg["header"].get("date")
            stamp = date.timestamp() if hasattr(date, "timestamp") else None
            if state == "busy":
                cell.busy_at = stamp
            elif state == "idle":
                cell.idle_at, cell.idle = stamp, True
                if cell.replied:
                    self._settle(cell)
            return True
        if msg_type == "stream":
            name, text = content.get("name"), content.get("text")
            if name not in ("stdout", "stderr") or not isinstance(text, str):
                raise GuestProtocolError("the kernel sent a stream message without a name and text")
            room = cell.room()
            if not cell.admit(len(text)):
                if room:  # the head that fits, to every consumer alike, then nothing more
                    self._stream(cell, message, name, text[:room])
                    self._stream(cell, message, "stderr", f"\n[vmcell: output past {cell.output_cap} bytes dropped]\n")
                return False
            self._stream(cell, message, name, text, relayed=True)
        elif msg_type == "execute_input":
            count = content.get("execution_count")
            if isinstance(count, int) and not cell.silent:
                result.execution_count = count
                cell.emit(OutputEvent("execution_count", count))
        elif msg_type in ("execute_result", "display_data", "update_display_data"):
            bundle = content.get("data")
            if not isinstance(bundle, dict) or not all(isinstance(k, str) for k in bundle):
                raise GuestProtocolError(f"the kernel sent {msg_type} without a MIME bundle")
            if not cell.admit(_size(bundle), main_result=msg_type == "execute_result"):
                return False
            item = Result.from_bundle(bundle, is_main_result=msg_type == "execute_result")
            result.results.append(item)
            cell.emit(OutputEvent("result", item))
        elif msg_type == "error":
            error = self._memory_checked(cell, _error_from(content))
            if not cell.timed_out:  # a timeout's KeyboardInterrupt is ours, not the user's
                result.error = error
                cell.emit(OutputEvent("error", error))
        return True

    @staticmethod
    def _memory_checked(cell: Cell, error: ExecutionError) -> ExecutionError:
        return memory_error(cell.memory, error) if cell.memory is not None else error

    def _stream(self, cell: Cell, message: KernelMessage, name: str, text: str, relayed: bool = False) -> None:
        """Stream text into the cell's result and events; unless the kernel's own message carries it on
        to the subscribers (`relayed`), it goes to them as a message of ours."""
        getattr(cell.result.logs, name).append(text)
        cell.emit(OutputEvent(name, text))
        if not relayed:
            self.router.publish(Channel.IOPUB, "stream", {"name": name, "text": text}, message.msg["parent_header"])

    def _settle(self, cell: Cell) -> None:
        cell.settled.set()
        if cell.timed_out:
            return  # the worker ends it, after _stop has cleaned up after it
        if cell.result.error is None:
            cell.end()
        else:
            self._spawn(self._end_after_checks(cell))

    async def _end_after_checks(self, cell: Cell) -> None:
        try:
            await self._contain(cell)
        finally:
            cell.end()

    async def _contain(self, cell: Cell) -> None:
        """After a cell that failed: if it ran into the kernel's process limit (a fork bomb, a Popen
        storm), what it started is killed, so the next cell has a kernel to run in. One round trip,
        and only for cells that did not end well; its error event has gone out, so the note also
        goes to the streams."""
        try:
            if (await self.agent.kernel_status()).get("pids_max_hit") is not True:
                return
        except VmcellError as exc:
            log.warning("cell %s: could not check the kernel's process limit: %s", cell.msg_id, exc)
            return
        note = await self._kill_leftovers(cell)
        if note:
            cell.emit(OutputEvent("stderr", f"[vmcell: {note}]\n"))

    async def _kill_leftovers(self, cell: Cell) -> str | None:
        """Kills the processes the (settled) cell started; its error will say so."""
        report = await self.agent.kernel_kill_children()
        if report.killed:
            limit = " (it had reached the kernel's process limit)" if report.pids_max_hit else ""
            note = f"the {report.killed} processes it started were killed{limit}"
        elif report.pids_max_hit:
            # A fork bomb's copies exit on their own once their fork fails: none may be left to kill.
            note = "it reached the kernel's process limit; the processes it started have exited"
        else:
            return None
        self._note(cell, note)
        return note

    def _on_agent_event(self, event: ControlEvent) -> None:
        if event.name == DROPPED and self._current is not None:
            self._current.result.truncated = True
        elif event.name == MEMORY_LIMIT:
            memory = MemoryEvent.parse(event.fields)
            if memory is None:
                log.warning("%s: ignoring an ill-shaped memory_limit event from the guest", self.router.link.name)
                return
            if memory.action == "interrupt":
                self.memory_interrupts += 1
            cell = self._current
            # Only for the cell the guest names (an event about another one is stale, or a lie).
            if cell is not None and not cell.done.is_set() and memory.msg_id == cell.msg_id \
                    and (cell.memory is None or memory.action == "oom_kill"):
                cell.memory = memory

    def _on_kernel_dead(self, why: str) -> None:
        cell = self._current
        if cell is not None:
            kind = MemoryLimitExceeded if self.lifecycle.last_death_oom else KernelDied
            cell.end(kind(f"{why}; the kernel is restarted and its variables are lost"))

    def _on_kernel_restarting(self, why: str) -> None:
        cell = self._current
        if cell is not None:
            cell.end(KernelDied(f"the kernel was restarted while the cell ran ({why}); its variables are lost"))

    # ---- the end ----------------------------------------------------------------------------

    def fail(self, fault: BaseException) -> None:
        """The session is gone: the running cell and every queued one end with `fault` now."""
        if self.fault is not None:
            return
        self.fault = fault
        queued, self._queue = list(self._queue), deque()
        for cell in ([self._current] if self._current else []) + queued:
            cell.end(fault)
        self._worker.cancel()
