"""The SDK's sandbox surface beside cells, named as E2B's: `sandbox.commands`, the extra
`sandbox.files` calls' return types, and `sandbox.get_metrics()`'s SandboxMetrics.

    result = sandbox.commands.run("ls -la", on_stdout=print)     # CommandResult
    handle = sandbox.commands.run("python -m http.server", background=True)
    handle.kill()

A command that exits non-zero raises CommandExitException (a CommandResult too), one that runs past
its `timeout` (default 60 s, 0: none) TimeoutException, as E2B's SDK does. The command's output
streams to on_stdout / on_stderr (plain strings, as E2B's) as it comes.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

DEFAULT_COMMAND_TIMEOUT_S = 60.0


@dataclass
class CommandResult:
    stderr: str
    stdout: str
    exit_code: int
    error: str | None = None


@dataclass
class EntryInfo:
    """A file or directory (E2B's EntryInfo); `entry["name"]` works too (vmcell's dicts did)."""

    name: str
    type: str  # file, dir, other
    path: str
    size: int = 0

    def __getitem__(self, item: str):
        return getattr(self, item)

    @classmethod
    def from_dict(cls, data: dict) -> "EntryInfo":
        return cls(data.get("name", ""), data.get("type", ""), data.get("path", ""), data.get("size") or 0)


@dataclass
class SandboxMetrics:
    cpu_count: int
    cpu_used_pct: float
    mem_used: int  # bytes
    mem_total: int
    disk_used: int
    disk_total: int
    timestamp: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def from_dict(cls, data: dict) -> "SandboxMetrics":
        return cls(data["cpu_count"], data["cpu_used_pct"], data["mem_used"], data["mem_total"], data["disk_used"],
                   data["disk_total"], datetime.fromtimestamp(data["timestamp"], tz=timezone.utc))


class FilesystemEventType(str, enum.Enum):
    CHMOD = "chmod"
    CREATE = "create"
    REMOVE = "remove"
    RENAME = "rename"
    WRITE = "write"
    OVERFLOW = "overflow"  # vmcell: events were lost (the guest's queue overflowed)


@dataclass
class FilesystemEvent:
    name: str  # relative to the watched directory
    type: FilesystemEventType


def _fs_event(line: dict) -> FilesystemEvent | None:
    if line.get("type") != "event":
        return None
    try:
        return FilesystemEvent(line.get("name", ""), FilesystemEventType(line.get("event_type")))
    except ValueError:
        return None


class WatchHandle:
    """A directory watch (E2B's sync WatchHandle): get_new_events() and stop()."""

    def __init__(self, sandbox, path: str, recursive: bool):
        self._sandbox = sandbox
        self._lines = sandbox._http.stream(sandbox._path("files/watch"), {"path": path, "recursive": recursive})
        start = next(line for line in self._lines if line.get("type") == "start")
        self._id = start["id"]
        self._events: list[FilesystemEvent] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="vmcell-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._lines:
                event = _fs_event(line)
                if event is not None:
                    with self._lock:
                        self._events.append(event)
        except Exception:  # the stream ended (stop(), or the sandbox went away)
            pass

    def get_new_events(self) -> list[FilesystemEvent]:
        """The changes since the last call."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def stop(self) -> None:
        self._sandbox._http.call("POST", f"/sessions/{self._sandbox._quoted_id}/files/watch/{self._id}/stop")
        self._thread.join(10)


class AsyncWatchHandle:
    """A directory watch (E2B's async WatchHandle): on_event gets each change; stop()."""

    def __init__(self, sandbox, path: str, recursive: bool, on_event, on_exit):
        self._sandbox, self._on_event, self._on_exit = sandbox, on_event, on_exit
        self._started = asyncio.Event()
        self._id: str | None = None
        self._calls: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run({"path": path, "recursive": recursive}))

    def _on_line(self, line: dict) -> None:
        if line.get("type") == "start":
            self._id = line["id"]
            self._started.set()
        event = _fs_event(line)
        if event is not None:
            self._calls.put_nowait(event)

    async def _run(self, body: dict) -> None:
        async def deliver():
            while True:
                event = await self._calls.get()
                outcome = self._on_event(event)
                if inspect.isawaitable(outcome):
                    await outcome
                self._calls.task_done()

        runner = asyncio.ensure_future(deliver())
        error = None
        try:
            await self._sandbox._http.stream(self._sandbox._path("files/watch"), body, self._on_line)
            await self._calls.join()
        except Exception as exc:
            error = exc
            raise
        finally:
            runner.cancel()
            self._started.set()
            if self._on_exit is not None:
                outcome = self._on_exit(error)
                if inspect.isawaitable(outcome):
                    await outcome

    async def _start(self) -> "AsyncWatchHandle":
        await self._started.wait()
        if self._id is None:
            await self._task  # its failure
        return self

    async def stop(self) -> None:
        await self._sandbox._http.call("POST", f"/sessions/{self._sandbox._quoted_id}/files/watch/{self._id}/stop")
        await asyncio.gather(self._task, return_exceptions=True)


def _body(cmd: str, envs, cwd, timeout) -> dict:
    body = {"cmd": cmd, "timeout": DEFAULT_COMMAND_TIMEOUT_S if timeout is None else timeout}
    if envs:
        body["envs"] = envs
    if cwd:
        body["cwd"] = cwd
    return body


def _outcome(stdout: list[str], stderr: list[str], end: dict | None) -> CommandResult:
    from .client import CommandExitException, SandboxError, TimeoutException

    if end is None:
        raise SandboxError(502, "IncompleteStream", "the server's stream ended before the command did")
    result = CommandResult("".join(stderr), "".join(stdout), end.get("exit_code", -1), end.get("error"))
    if end.get("timed_out"):
        raise TimeoutException(504, "CommandTimeout", result.error or "the command timed out")
    if result.exit_code != 0:
        raise CommandExitException(result.stderr, result.stdout, result.exit_code, result.error)
    return result


class _Collector:
    def __init__(self, on_stdout, on_stderr):
        self.out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.handlers = {"stdout": on_stdout, "stderr": on_stderr}
        self.end: dict | None = None
        self.start: dict | None = None

    def feed(self, line: dict) -> tuple[Callable | None, Any]:
        kind = line.get("type")
        if kind in self.out:
            self.out[kind].append(line.get("data", ""))
            return self.handlers[kind], line.get("data", "")
        if kind == "start":
            self.start = line
        elif kind == "end":
            self.end = line
        return None, None


# ---- sync -----------------------------------------------------------------------------------------


class CommandHandle:
    """A background command (E2B's CommandHandle): its pid, wait() and kill()."""

    def __init__(self, sandbox, lines, on_stdout, on_stderr):
        self._sandbox, self._lines = sandbox, lines
        self._collector = _Collector(on_stdout, on_stderr)
        self._failure: BaseException | None = None
        for line in lines:  # up to its start line: the pid
            self._collector.feed(line)
            if self._collector.start is not None:
                break
        if self._collector.start is None:
            _outcome([], [], None)
        self.pid: int = self._collector.start["pid"]
        self._id: str = self._collector.start["id"]
        self._thread: threading.Thread | None = None

    def _drain(self) -> None:
        try:
            for line in self._lines:
                callback, arg = self._collector.feed(line)
                if callback is not None:
                    callback(arg)
        except BaseException as exc:  # the caller of wait() hears of it
            self._failure = exc

    def _background(self) -> "CommandHandle":
        self._thread = threading.Thread(target=self._drain, name=f"vmcell-command-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def wait(self, on_stdout=None, on_stderr=None) -> CommandResult:
        """The command's result once it ends; CommandExitException if it exited non-zero."""
        if on_stdout is not None or on_stderr is not None:
            self._collector.handlers.update({k: v for k, v in (("stdout", on_stdout), ("stderr", on_stderr)) if v})
        if self._thread is None:
            self._drain()
        else:
            self._thread.join()
        if self._failure is not None:
            raise self._failure
        return _outcome(self._collector.out["stdout"], self._collector.out["stderr"], self._collector.end)

    def kill(self) -> bool:
        """SIGKILLs the command and everything it started; False if it was not running any more."""
        path = f"/sessions/{self._sandbox._quoted_id}/commands/{self._id}/kill"
        return json.loads(self._sandbox._http.call("POST", path))["killed"] is True


class Commands:
    def __init__(self, sandbox):
        self._sandbox = sandbox

    def run(self, cmd: str, background: bool = False, envs: dict[str, str] | None = None, user: str | None = None,
            cwd: str | None = None, on_stdout: Callable[[str], Any] | None = None,
            on_stderr: Callable[[str], Any] | None = None, timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
            **kwargs) -> CommandResult | CommandHandle:
        """Runs `cmd` with /bin/bash -c in the sandbox (as root: `user` is accepted and ignored)."""
        lines = self._sandbox._http.stream(self._sandbox._path("commands"), _body(cmd, envs, cwd, timeout))
        handle = CommandHandle(self._sandbox, lines, on_stdout, on_stderr)
        return handle._background() if background else handle.wait()


# ---- async ----------------------------------------------------------------------------------------


class AsyncCommandHandle:
    def __init__(self, sandbox, body: dict, on_stdout, on_stderr):
        self._sandbox = sandbox
        self._collector = _Collector(on_stdout, on_stderr)
        self._started = asyncio.Event()
        self._calls: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(body))
        self.pid: int | None = None
        self._id: str | None = None

    def _on_line(self, line: dict) -> None:
        callback, arg = self._collector.feed(line)
        if self._collector.start is not None and not self._started.is_set():
            self.pid, self._id = self._collector.start["pid"], self._collector.start["id"]
            self._started.set()
        if callback is not None:
            self._calls.put_nowait((callback, arg))

    async def _run(self, body: dict) -> None:
        async def callbacks():
            while True:
                callback, arg = await self._calls.get()
                outcome = callback(arg)
                if inspect.isawaitable(outcome):
                    await outcome
                self._calls.task_done()

        runner = asyncio.ensure_future(callbacks())
        try:
            await self._sandbox._http.stream(self._sandbox._path("commands"), body, self._on_line)
            await self._calls.join()
        finally:
            runner.cancel()
            self._started.set()

    async def _start(self) -> "AsyncCommandHandle":
        await self._started.wait()
        if self.pid is None:
            await self._task  # its failure
            _outcome([], [], None)
        return self

    async def wait(self, on_stdout=None, on_stderr=None) -> CommandResult:
        if on_stdout is not None or on_stderr is not None:
            self._collector.handlers.update({k: v for k, v in (("stdout", on_stdout), ("stderr", on_stderr)) if v})
        await self._task
        return _outcome(self._collector.out["stdout"], self._collector.out["stderr"], self._collector.end)

    async def kill(self) -> bool:
        path = f"/sessions/{self._sandbox._quoted_id}/commands/{self._id}/kill"
        return json.loads(await self._sandbox._http.call("POST", path))["killed"] is True


class AsyncCommands:
    def __init__(self, sandbox):
        self._sandbox = sandbox

    async def run(self, cmd: str, background: bool = False, envs: dict[str, str] | None = None,
                  user: str | None = None, cwd: str | None = None, on_stdout=None, on_stderr=None,
                  timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S, **kwargs) -> CommandResult | AsyncCommandHandle:
        handle = await AsyncCommandHandle(self._sandbox, _body(cmd, envs, cwd, timeout), on_stdout, on_stderr)._start()
        return handle if background else await handle.wait()
