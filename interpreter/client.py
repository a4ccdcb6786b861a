"""Python SDK, shaped like E2B Code Interpreter's: port agent code by changing the import.

    from interpreter.client import Sandbox            # was: from e2b_code_interpreter import Sandbox

    with Sandbox.create() as sandbox:
        execution = sandbox.run_code("x = 41; x + 1", on_stdout=print)
        print(execution.text)                         # 42
        sandbox.files.write("data.csv", "a,b\\n1,2\\n")

    sandbox_id = sandbox.pause()                      # saved to disk; variables and files kept
    sandbox = Sandbox.connect(sandbox_id)             # later, from anywhere: resumed
    children = sandbox.fork(count=2)                  # two more sandboxes with the same state

AsyncSandbox is the same with `await` (its callbacks may be coroutines; they are awaited in order).
Server address and token: arguments, else $VMCELL_URL / $VMCELL_TOKEN, else the local server's
defaults (http://127.0.0.1:8890, i.e. config.DEFAULT_HOST and DEFAULT_PORT, and the token in
$VMCELL_HOME/token).
"""

from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .config import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TEMPLATE, vmcell_home
from .charts import (  # noqa: F401 (E2B's chart types, importable from here as from e2b_code_interpreter)
    BarChart, BarData, BoxAndWhiskerChart, BoxAndWhiskerData, Chart, Chart2D, ChartType, LineChart, PieChart, PieData,
    PointChart, PointData, ScaleType, ScatterChart, SuperChart,
)
from .models import Execution, ExecutionError, Logs, Result
from .sdk_surface import (
    AsyncCommandHandle, AsyncCommands, AsyncWatchHandle, CommandHandle, CommandResult, Commands, EntryInfo,
    FilesystemEvent, FilesystemEventType, SandboxMetrics, WatchHandle,
)
from .client_contexts import AsyncCodeContexts, CodeContexts, Context, cell_context

__all__ = ["Sandbox", "AsyncSandbox", "SandboxInfo", "Execution", "Result", "Logs", "ExecutionError", "OutputMessage",
           "SandboxError", "NotFoundError", "SessionGoneError", "SessionClosedError", "VMDiedError",
           "KernelDiedError", "MemoryLimitExceededError", "GuestError", "Context",
           # E2B's sandbox surface and names (sdk_surface.py, charts.py, models.py)
           "CommandResult", "CommandHandle", "AsyncCommandHandle", "CommandExitException", "TimeoutException",
           "SandboxException", "NotFoundException", "EntryInfo", "SandboxMetrics", "FilesystemEvent",
           "FilesystemEventType", "WatchHandle", "AsyncWatchHandle", "ChartType", "ScaleType", "Chart",
           "LineChart", "ScatterChart", "BarChart", "PieChart", "BoxAndWhiskerChart", "SuperChart"]

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
REQUEST_TIMEOUT_S = 600.0


class SandboxError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class NotFoundError(SandboxError):
    """404: the server never had a session with this id."""


class SessionGoneError(SandboxError):
    """410: the sandbox ended; `message` says why. A cell that was running raises it too."""

    execution: "Execution | None" = None


class SessionClosedError(SessionGoneError):
    """The sandbox was closed (kill(), its timeout, the server stopping) while the call ran."""


class VMDiedError(SessionGoneError):
    """The sandbox's VM died (or its guest broke the protocol)."""


class KernelDiedError(SandboxError):
    """The kernel died mid-cell (e.g. out of memory). The sandbox lives on with a fresh kernel;
    `execution` holds what the cell produced before."""

    execution: "Execution | None" = None


class MemoryLimitExceededError(KernelDiedError):
    """The kernel was killed by the guest's OOM killer for exceeding its memory limit (a cell
    interrupted at the memory high-water mark is not raised: its `execution.error.name` is
    MemoryLimitExceeded and the kernel keeps its variables)."""


class GuestError(SandboxError):
    """The guest answered outside the protocol for this cell (a malformed reply)."""

    execution: "Execution | None" = None


class TimeoutException(SandboxError):
    """E2B's name: a command ran past its timeout (it was killed)."""


class CommandExitException(SandboxError, CommandResult):
    """E2B's name: a command exited non-zero. It is the CommandResult too (stdout, stderr, exit_code, error)."""

    def __init__(self, stderr: str, stdout: str, exit_code: int, error: str | None = None):
        CommandResult.__init__(self, stderr, stdout, exit_code, error)
        SandboxError.__init__(self, 200, "CommandExit", f"the command exited with code {exit_code}")

    def __str__(self) -> str:
        return f"Command exited with code {self.exit_code} and error:\n{self.stderr}"  # E2B's text

    __eq__ = object.__eq__
    __hash__ = object.__hash__


SandboxException = SandboxError  # E2B's names
NotFoundException = NotFoundError


# The server's error names (the `error` of a JSON error, the `name` of a fault line) -> what we raise.
_ERROR_TYPES = {
    "SessionClosed": (SessionClosedError, 410), "VMDied": (VMDiedError, 410), "GuestBrokeLink": (VMDiedError, 410),
    "KernelDied": (KernelDiedError, 409), "MemoryLimitExceeded": (MemoryLimitExceededError, 409),
    "GuestProtocolError": (GuestError, 502),
}


@dataclass(frozen=True)
class OutputMessage:
    """What on_stdout / on_stderr receive (E2B's shape): str() of it is the text."""

    line: str
    timestamp: float
    error: bool = False

    def __str__(self) -> str:
        return self.line


def _datetime(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc)


@dataclass(frozen=True)
class SandboxInfo:
    """What get_info() and list() return (E2B's names where E2B has one). Times are timezone-aware UTC."""

    sandbox_id: str
    template_id: str  # the template's name (vmcell templates are named, e.g. "python")
    state: str  # running, paused (in memory), saved (on disk), closed, dead
    started_at: datetime
    end_at: datetime | None  # when it will be closed (its lifetime or set_timeout); None: no deadline
    hostname: str = ""
    cause: str | None = None  # why it ended, for closed and dead ones
    idle_timeout: float | None = None  # seconds unused before it is closed
    last_activity: datetime | None = None
    restore_ms: float | None = None
    accel: str = ""  # the accelerator its VM runs under (tcg, kvm)
    paused_at: datetime | None = None  # when it was paused or saved; None while running
    durable: bool = False  # kept in the server's state directory: it outlives a server restart
    network: dict | None = None  # {"allow": [...]} with header values redacted; None: no network

    @classmethod
    def from_dict(cls, info: dict) -> "SandboxInfo":
        """From the server's session JSON (GET /sessions/{id})."""
        return cls(sandbox_id=info["id"], template_id=info.get("template", ""), state=info.get("state", ""),
                   started_at=_datetime(info.get("created_at", 0.0)), end_at=_datetime(info.get("expires_at")),
                   hostname=info.get("hostname", ""), cause=info.get("cause"), idle_timeout=info.get("idle_timeout"),
                   last_activity=_datetime(info.get("last_activity")), restore_ms=info.get("restore_ms"),
                   accel=info.get("accel", ""), paused_at=_datetime(info.get("paused_at")),
                   durable=bool(info.get("durable")), network=info.get("network"))


def _create_body(template: str, envs, timeout, network) -> dict:
    body = {"template": template, "env": envs or {}, "lifetime": timeout}
    if network is not None:
        body["network"] = network
    return body


# A sandbox in one of these states is brought back by connect() (any request would also bring it back).
_RESUMABLE = ("paused", "saved")


def _connection(base_url: str | None, token: str | None) -> tuple[str, str]:
    url = (base_url or os.environ.get("VMCELL_URL") or DEFAULT_URL).rstrip("/")
    token = token or os.environ.get("VMCELL_TOKEN")
    if not token:
        path = vmcell_home() / "token"
        token = path.read_text().strip() if path.is_file() else ""
    if not token:
        raise SandboxError(401, "Unauthorized", "no token: pass token=..., set VMCELL_TOKEN, or run `vmcell serve` here")
    return url, token


def _quote(sandbox_id: str) -> str:
    """An id as one path segment: whatever a caller passes to connect() never reaches another route."""
    return urllib.parse.quote(sandbox_id, safe="")


def _raise_for(status: int, payload: bytes) -> None:
    if status < 400:
        return
    name = ""
    try:
        data = json.loads(payload)
        reason, message, name = data.get("reason", ""), data.get("message", ""), data.get("error", "")
    except ValueError:
        reason, message = "", payload.decode(errors="replace")[:500]
    kind = _ERROR_TYPES.get(name, (None,))[0] or (NotFoundError if status == 404 else SessionGoneError if status == 410
                                                 else SandboxError)
    raise kind(status, reason, message)


class _Assembler:
    """Turns the NDJSON events of one cell into an Execution, and into callback calls."""

    def __init__(self, on_stdout, on_stderr, on_result, on_error):
        self.execution = Execution()
        self.handlers = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result, "error": on_error}
        self.fault: ExecutionError | None = None
        self.ended = False

    def outcome(self) -> Execution:
        """The Execution, or the typed error of a cell that did not end by itself."""
        if self.fault is None:
            if not self.ended:  # the connection ended mid-cell: never pass that off as a finished cell
                raise SandboxError(502, "IncompleteStream", "the server's stream ended before the cell did")
            return self.execution
        kind, status = _ERROR_TYPES.get(self.fault.name, (SandboxError, 502))
        error = kind(status, self.fault.name, self.fault.value)
        error.execution = self.execution
        raise error

    def feed(self, event: dict) -> tuple[Callable | None, Any]:
        kind, ex = event.get("type"), self.execution
        if kind in ("stdout", "stderr"):
            getattr(ex.logs, kind).append(event.get("text", ""))
            return self.handlers[kind], OutputMessage(event.get("text", ""), time.time(), kind == "stderr")
        if kind == "result":
            result = Result.from_dict({k: v for k, v in event.items() if k != "type"})
            ex.results.append(result)
            return self.handlers["result"], result
        if kind == "error":
            error = ExecutionError.from_dict(event)
            if error.fault:  # the cell did not end by itself: run_code raises once the stream is over
                self.fault = error
                return None, None
            ex.error = error
            return self.handlers["error"], ex.error
        if kind == "execution_count":
            ex.execution_count = event.get("execution_count")
        elif kind == "end":
            self.ended = True
            ex.execution_count = event.get("execution_count", ex.execution_count)
            ex.duration_ms = event.get("duration_ms", 0.0)
            ex.truncated = bool(event.get("truncated"))
        return None, None


# ---- sync -----------------------------------------------------------------------------------------


class _SyncHTTP:
    def __init__(self, base_url: str, token: str, request_timeout: float):
        self.url = urllib.parse.urlsplit(base_url)
        self.token, self.timeout = token, request_timeout

    def _open(self, method: str, path: str, body: bytes | None, headers: dict) -> http.client.HTTPResponse:
        conn_cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(self.url.hostname, self.url.port, timeout=self.timeout)
        conn.request(method, self.url.path + path, body=body,
                     headers={"Authorization": f"token {self.token}", **headers})
        return conn.getresponse()

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> bytes:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = self._open(method, path, data, {"Content-Type": "application/json"} if raw is None else {})
        payload = response.read()
        _raise_for(response.status, payload)
        return payload

    def stream(self, path: str, body: dict):
        response = self._open("POST", path, json.dumps(body).encode(),
                              {"Content-Type": "application/json", "Accept": "application/x-ndjson"})
        if response.status >= 400:
            _raise_for(response.status, response.read())
        with response:
            for line in response:
                if line.strip():
                    yield json.loads(line)


class Files:
    def __init__(self, sandbox):
        self._sandbox = sandbox

    def write(self, path: str, data: str | bytes) -> dict:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return json.loads(self._sandbox._http.call("PUT", self._sandbox._path("files/content", path), raw=raw))

    def read(self, path: str, format: str = "text") -> str | bytes:
        data = self._sandbox._http.call("GET", self._sandbox._path("files/content", path))
        return data.decode() if format == "text" else data

    def list(self, path: str = ".") -> list[EntryInfo]:
        entries = json.loads(self._sandbox._http.call("GET", self._sandbox._path("files", path)))["entries"]
        return [EntryInfo.from_dict(e) for e in entries]

    # E2B's: exists -> bool, remove -> None, make_dir -> created (False: it existed), rename -> EntryInfo
    def exists(self, path: str) -> bool:
        return json.loads(self._sandbox._http.call("GET", self._sandbox._path("files/exists", path)))["exists"]

    def remove(self, path: str) -> None:
        self._sandbox._http.call("POST", self._sandbox._path("files/remove"), {"path": path})

    def make_dir(self, path: str) -> bool:
        return json.loads(self._sandbox._http.call("POST", self._sandbox._path("files/dir"), {"path": path}))["created"]

    def rename(self, old_path: str, new_path: str) -> EntryInfo:
        body = {"path": old_path, "new_path": new_path}
        return EntryInfo.from_dict(json.loads(self._sandbox._http.call("POST", self._sandbox._path("files/rename"), body)))

    def watch_dir(self, path: str, recursive: bool = False, **kwargs) -> WatchHandle:
        """Watches a directory: handle.get_new_events() gives the changes since the last call; stop()."""
        return WatchHandle(self._sandbox, path, recursive)


class Sandbox(CodeContexts):
    def __init__(self, sandbox_id: str, http: _SyncHTTP, info: dict):
        self.sandbox_id, self._http, self.info = sandbox_id, http, info
        self.files = Files(self)
        self.commands = Commands(self)

    @classmethod
    def create(cls, template: str = DEFAULT_TEMPLATE, envs: dict[str, str] | None = None, timeout: float | None = None,
               base_url: str | None = None, token: str | None = None,
               request_timeout: float = REQUEST_TIMEOUT_S, network: dict | bool | None = None) -> "Sandbox":
        """`timeout` is the sandbox's lifetime in seconds, as in E2B. `network`: {"allow": [...]}
        (hosts, *.domains, host:port, ip:port, {"host", "headers"}; docs/network.md), False for
        none; by default the template's (none for python)."""
        http = _SyncHTTP(*_connection(base_url, token), request_timeout)
        info = json.loads(http.call("POST", "/sessions", _create_body(template, envs, timeout, network)))
        return cls(info["id"], http, info)

    @classmethod
    def connect(cls, sandbox_id: str, timeout: float | None = None, base_url: str | None = None,
                token: str | None = None, request_timeout: float = REQUEST_TIMEOUT_S) -> "Sandbox":
        """The sandbox with this id, running: a paused or saved one is resumed. `timeout`, if given,
        closes it that many seconds from now (as set_timeout). NotFoundError for an id the server never
        had, SessionGoneError (with the cause) for one that was closed or died."""
        http = _SyncHTTP(*_connection(base_url, token), request_timeout)
        info = json.loads(http.call("GET", f"/sessions/{_quote(sandbox_id)}"))
        if info.get("state") in _RESUMABLE:
            info = json.loads(http.call("POST", f"/sessions/{_quote(sandbox_id)}/resume"))
        sandbox = cls(info["id"], http, info)
        if timeout is not None:
            sandbox.set_timeout(timeout)
        return sandbox

    @classmethod
    def list(cls, base_url: str | None = None, token: str | None = None,
             request_timeout: float = REQUEST_TIMEOUT_S) -> list[SandboxInfo]:
        """The server's live sandboxes: running, paused and saved ones."""
        http = _SyncHTTP(*_connection(base_url, token), request_timeout)
        return [SandboxInfo.from_dict(info) for info in json.loads(http.call("GET", "/sessions"))["sessions"]]

    def _path(self, action: str, path: str | None = None) -> str:
        suffix = f"?{urllib.parse.urlencode({'path': path})}" if path is not None else ""
        return f"/sessions/{_quote(self.sandbox_id)}/{action}{suffix}"

    def get_info(self) -> SandboxInfo:
        self.info = json.loads(self._http.call("GET", f"/sessions/{_quote(self.sandbox_id)}"))
        return SandboxInfo.from_dict(self.info)

    @property
    def _quoted_id(self) -> str:
        return _quote(self.sandbox_id)

    def get_metrics(self, start: datetime | None = None, end: datetime | None = None) -> list[SandboxMetrics]:
        """The VM's CPU, memory and disk use, as E2B's list of samples: vmcell keeps no history, so the
        list holds one sample taken now (`start` and `end` are accepted for E2B's signature)."""
        return [SandboxMetrics.from_dict(json.loads(self._http.call("GET", self._path("metrics"))))]

    def pause(self) -> str:
        """Saves the sandbox to disk and frees its RAM; returns its id, for Sandbox.connect(id) later
        (from this process or another). Any call on this object also resumes it."""
        self.info = json.loads(self._http.call("POST", self._path("pause")))
        return self.sandbox_id

    def set_timeout(self, timeout: float) -> None:
        """The sandbox is closed `timeout` seconds from now (extends or shortens its lifetime)."""
        self.info = json.loads(self._http.call("POST", self._path("timeout"), {"timeout": timeout}))

    def fork(self, count: int = 1, timeout: float | None = None) -> list["Sandbox"]:
        """`count` new sandboxes with this one's variables, files and kernel as they are now, each its
        own machine (hostname, entropy); this one keeps running. `timeout`: each child's lifetime."""
        body = {"count": count} if timeout is None else {"count": count, "timeout": timeout}
        children = json.loads(self._http.call("POST", self._path("fork"), body))["sessions"]
        return [type(self)(info["id"], self._http, info) for info in children]

    def run_code(self, code: str, on_stdout=None, on_stderr=None, on_result=None, on_error=None,
                 envs: dict[str, str] | None = None, timeout: float | None = None,
                 language: str | None = None, context: Context | str | None = None) -> Execution:
        where = cell_context(language, context)  # a code context (client_contexts.py); ValueError for both
        assembler = _Assembler(on_stdout, on_stderr, on_result, on_error)
        body = {"code": code, "env": envs, "timeout": timeout, **where}
        for event in self._http.stream(self._path("execute"), {k: v for k, v in body.items() if v is not None}):
            callback, arg = assembler.feed(event)
            if callback is not None:
                callback(arg)
        return assembler.outcome()

    def interrupt(self) -> None:
        self._http.call("POST", self._path("interrupt"))

    def restart(self) -> None:
        self._http.call("POST", self._path("restart"))

    def kill(self) -> None:
        try:
            self._http.call("DELETE", f"/sessions/{_quote(self.sandbox_id)}")
        except (NotFoundError, SessionGoneError):
            pass  # already gone (reaped, killed, or dead)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


# ---- async ----------------------------------------------------------------------------------------


class _AsyncHTTP:
    def __init__(self, base_url: str, token: str, request_timeout: float):
        self.base, self.token, self.timeout = base_url, token, request_timeout
        self.client = AsyncHTTPClient()

    def _request(self, method: str, path: str, body: bytes | None, headers: dict, **kw) -> HTTPRequest:
        if method in ("POST", "PUT") and body is None:
            body = b""
        return HTTPRequest(self.base + path, method=method, body=body, request_timeout=self.timeout,
                           headers={"Authorization": f"token {self.token}", **headers}, **kw)

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> bytes:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            response = await self.client.fetch(self._request(method, path, data, {}))
        except HTTPClientError as exc:
            if exc.response is None:
                raise
            _raise_for(exc.code, exc.response.body or b"")
            raise
        return response.body

    async def stream(self, path: str, body: dict, on_line: Callable[[dict], None]) -> None:
        buffer = bytearray()

        def chunk(data: bytes) -> None:
            buffer.extend(data)
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if line.strip():
                    on_line(json.loads(line))

        request = self._request("POST", path, json.dumps(body).encode(), {"Accept": "application/x-ndjson"},
                                streaming_callback=chunk)
        try:
            await self.client.fetch(request)
        except HTTPClientError as exc:
            _raise_for(exc.code, bytes(buffer) or b"")
            raise


class AsyncFiles:
    def __init__(self, sandbox):
        self._sandbox = sandbox

    async def write(self, path: str, data: str | bytes) -> dict:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return json.loads(await self._sandbox._http.call("PUT", self._sandbox._path("files/content", path), raw=raw))

    async def read(self, path: str, format: str = "text") -> str | bytes:
        data = await self._sandbox._http.call("GET", self._sandbox._path("files/content", path))
        return data.decode() if format == "text" else data

    async def list(self, path: str = ".") -> list[EntryInfo]:
        entries = json.loads(await self._sandbox._http.call("GET", self._sandbox._path("files", path)))["entries"]
        return [EntryInfo.from_dict(e) for e in entries]

    async def exists(self, path: str) -> bool:
        return json.loads(await self._sandbox._http.call("GET", self._sandbox._path("files/exists", path)))["exists"]

    async def remove(self, path: str) -> None:
        await self._sandbox._http.call("POST", self._sandbox._path("files/remove"), {"path": path})

    async def make_dir(self, path: str) -> bool:
        reply = await self._sandbox._http.call("POST", self._sandbox._path("files/dir"), {"path": path})
        return json.loads(reply)["created"]

    async def rename(self, old_path: str, new_path: str) -> EntryInfo:
        body = {"path": old_path, "new_path": new_path}
        reply = await self._sandbox._http.call("POST", self._sandbox._path("files/rename"), body)
        return EntryInfo.from_dict(json.loads(reply))

    async def watch_dir(self, path: str, on_event, on_exit=None, recursive: bool = False,
                        **kwargs) -> AsyncWatchHandle:
        """Watches a directory: on_event (a coroutine too) gets each change, in order; stop()."""
        return await AsyncWatchHandle(self._sandbox, path, recursive, on_event, on_exit)._start()


class AsyncSandbox(AsyncCodeContexts):
    def __init__(self, sandbox_id: str, http: _AsyncHTTP, info: dict):
        self.sandbox_id, self._http, self.info = sandbox_id, http, info
        self.files = AsyncFiles(self)
        self.commands = AsyncCommands(self)

    _path = Sandbox._path
    _quoted_id = Sandbox._quoted_id

    async def get_metrics(self, start: datetime | None = None, end: datetime | None = None) -> list[SandboxMetrics]:
        return [SandboxMetrics.from_dict(json.loads(await self._http.call("GET", self._path("metrics"))))]

    @classmethod
    async def create(cls, template: str = DEFAULT_TEMPLATE, envs: dict[str, str] | None = None,
                     timeout: float | None = None, base_url: str | None = None, token: str | None = None,
                     request_timeout: float = REQUEST_TIMEOUT_S, network: dict | bool | None = None) -> "AsyncSandbox":
        http = _AsyncHTTP(*_connection(base_url, token), request_timeout)
        info = json.loads(await http.call("POST", "/sessions", _create_body(template, envs, timeout, network)))
        return cls(info["id"], http, info)

    @classmethod
    async def connect(cls, sandbox_id: str, timeout: float | None = None, base_url: str | None = None,
                      token: str | None = None, request_timeout: float = REQUEST_TIMEOUT_S) -> "AsyncSandbox":
        """As Sandbox.connect: a paused or saved sandbox is resumed."""
        http = _AsyncHTTP(*_connection(base_url, token), request_timeout)
        info = json.loads(await http.call("GET", f"/sessions/{_quote(sandbox_id)}"))
        if info.get("state") in _RESUMABLE:
            info = json.loads(await http.call("POST", f"/sessions/{_quote(sandbox_id)}/resume"))
        sandbox = cls(info["id"], http, info)
        if timeout is not None:
            await sandbox.set_timeout(timeout)
        return sandbox

    @classmethod
    async def list(cls, base_url: str | None = None, token: str | None = None,
                   request_timeout: float = REQUEST_TIMEOUT_S) -> list[SandboxInfo]:
        http = _AsyncHTTP(*_connection(base_url, token), request_timeout)
        return [SandboxInfo.from_dict(info) for info in json.loads(await http.call("GET", "/sessions"))["sessions"]]

    async def get_info(self) -> SandboxInfo:
        self.info = json.loads(await self._http.call("GET", f"/sessions/{_quote(self.sandbox_id)}"))
        return SandboxInfo.from_dict(self.info)

    async def pause(self) -> str:
        self.info = json.loads(await self._http.call("POST", self._path("pause")))
        return self.sandbox_id

    async def set_timeout(self, timeout: float) -> None:
        self.info = json.loads(await self._http.call("POST", self._path("timeout"), {"timeout": timeout}))

    async def fork(self, count: int = 1, timeout: float | None = None) -> list["AsyncSandbox"]:
        body = {"count": count} if timeout is None else {"count": count, "timeout": timeout}
        children = json.loads(await self._http.call("POST", self._path("fork"), body))["sessions"]
        return [type(self)(info["id"], self._http, info) for info in children]

    async def run_code(self, code: str, on_stdout=None, on_stderr=None, on_result=None, on_error=None,
                       envs: dict[str, str] | None = None, timeout: float | None = None,
                       language: str | None = None, context: Context | str | None = None) -> Execution:
        where = cell_context(language, context)  # a code context (client_contexts.py); ValueError for both
        assembler = _Assembler(on_stdout, on_stderr, on_result, on_error)
        calls: asyncio.Queue = asyncio.Queue()

        def on_line(event: dict) -> None:
            callback, arg = assembler.feed(event)
            if callback is not None:
                calls.put_nowait((callback, arg))

        async def run_callbacks() -> None:  # in arrival order; coroutines are awaited
            while True:
                callback, arg = await calls.get()
                outcome = callback(arg)
                if inspect.isawaitable(outcome):
                    await outcome
                calls.task_done()

        runner = asyncio.ensure_future(run_callbacks())
        try:
            body = {"code": code, "env": envs, "timeout": timeout, **where}
            await self._http.stream(self._path("execute"), {k: v for k, v in body.items() if v is not None}, on_line)
            joined = asyncio.ensure_future(calls.join())
            await asyncio.wait({joined, runner}, return_when=asyncio.FIRST_COMPLETED)
            joined.cancel()
            if runner.done() and not runner.cancelled() and runner.exception():
                raise runner.exception()  # a callback failed: the caller should hear of it
        finally:
            runner.cancel()
        return assembler.outcome()

    async def interrupt(self) -> None:
        await self._http.call("POST", self._path("interrupt"))

    async def restart(self) -> None:
        await self._http.call("POST", self._path("restart"))

    async def kill(self) -> None:
        try:
            await self._http.call("DELETE", f"/sessions/{_quote(self.sandbox_id)}")
        except (NotFoundError, SessionGoneError):
            pass

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.kill()
