"""vmcell's tools for LLM clients over MCP (the Model Context Protocol, official `mcp` SDK 2.x).

The tools are written once, here, against a SessionManager in this process, and served two ways:

  vmcell mcp          stdio: a process with its own manager (VMs started here, reaped on exit/EOF/SIGTERM)
  vmcell serve        streamable HTTP at /mcp behind the token (server/mcp.py bridges it onto Tornado)

Tools: run_code, create_session, close_session, list_sessions, read_file, write_file, run_command.
A call without `session_id` starts a fresh session that is kept; its id is in the answer so the
caller can pass it next time (variables, files and installed packages live on in it). Cell output
comes back as MCP content: stdout/stderr/results/errors as text blocks, PNG and JPEG images as image
blocks. A cell that raised, a command that failed and a vmcell failure (an unknown or ended
session, the session limit, a guest error) are tool results with `isError` set and a message that
says what happened and what to do, never a protocol error.

Everything from the guest is untrusted: image data is checked to be base64 of a PNG or JPEG before
it is handed on, and text is cut at MCP_TEXT_LIMIT_CHARS per block (an LLM's context is the limit).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import logging
import signal
import sys
from typing import Annotated, Awaitable, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from . import __version__
from .config import (DEFAULT_TEMPLATE, MCP_COMMAND_TIMEOUT_MAX_S, MCP_COMMAND_TIMEOUT_S, MCP_PROGRESS_LIMIT_CHARS,
                     MCP_STDIN_LINE_LIMIT, MCP_TEXT_LIMIT_CHARS)
from .errors import SessionGone, SessionNotFound, VmcellError
from .kernel.results import ExecutionResult, OutputEvent, Result

log = logging.getLogger("vmcell.mcp")

# Result fields shown as text, best first (run.py prints the same ones).
TEXT_FORMATS = ("text", "markdown", "latex", "html", "json")
IMAGE_MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}

INSTRUCTIONS = """\
vmcell runs Python in isolated microVM sessions (an IPython kernel each; numpy, pandas and matplotlib
are installed). A session keeps its variables, files and installed packages between calls: call
run_code without session_id once, then pass the session_id from its answer to every later call.
Plots made with matplotlib come back as images. Close sessions you no longer need with close_session."""

SessionId = Annotated[str | None, Field(description=(
    "The session to use, as returned by an earlier call. Omit it to start a fresh session; its id is "
    "in the answer: pass it on later calls to keep variables and files."))]
RequiredSessionId = Annotated[str, Field(description="The session's id, as returned by an earlier call.")]
GuestPath = Annotated[str, Field(description=(
    "A path in the session's guest; relative paths are relative to the home directory the code runs in."))]


def cut(text: str, what: str = "output", limit: int = MCP_TEXT_LIMIT_CHARS) -> str:
    """Text for an LLM: at most `limit` characters, with a note saying how much was left out."""
    if len(text) <= limit:
        return text
    return (text[:limit] + f"\n[... {len(text) - limit} more characters of {what} cut; write large output to a "
            "file and read parts of it]")


def text(value: str) -> TextContent:
    return TextContent(type="text", text=value)


def checked_image(data: str | None, mime: str) -> bytes | None:
    """The bytes of a base64 image from the guest, if it is one of the kind it claims to be."""
    if not isinstance(data, str):
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(IMAGE_MAGIC[mime]) else None


def error_result(exc: VmcellError) -> CallToolResult:
    """A vmcell failure as a tool error the model can act on."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SessionNotFound):
        message += ". list_sessions shows the live sessions; omit session_id to start a new one."
    elif isinstance(exc, SessionGone):
        message += ". Omit session_id to start a new session (variables and files of this one are gone)."
    return CallToolResult(content=[text(message)], is_error=True)


def result_content(result: Result) -> list[TextContent | ImageContent]:
    """One cell result as content blocks: images as images (their text is only a repr), else its text."""
    label = "[result]" if result.is_main_result else "[display]"
    blocks: list[TextContent | ImageContent] = []
    for mime, name in (("image/png", "png"), ("image/jpeg", "jpeg")):
        value = getattr(result, name)
        if value is None:
            continue
        if checked_image(value, mime) is not None:
            blocks.append(ImageContent(type="image", data=value, mime_type=mime))
        else:
            blocks.append(text(f"{label} [{name} image: not valid base64 {name}, left out]"))
    if blocks:
        return blocks
    for name in TEXT_FORMATS:
        value = getattr(result, name)
        if value is not None:
            shown = value if isinstance(value, str) else repr(value)
            return [text(f"{label}\n{cut(shown, 'the result')}")]
    if result.svg is not None:
        return [text(f"{label} [svg image]\n{cut(result.svg, 'the svg')}")]
    other = [n for n in ("pdf", "javascript") if getattr(result, n) is not None] + list(result.extra)
    return [text(f"{label} [a result in {', '.join(other) or 'no format'}: not shown here]")]


def execution_content(session_id: str, created: bool, result: ExecutionResult) -> CallToolResult:
    header = f"session_id: {session_id}"
    if created:
        header += " (a new session: pass this session_id to later calls to keep its variables and files)"
    header += f"\nexecution_count: {result.execution_count}, {result.duration_ms:.0f} ms"
    if result.truncated:
        header += "\n(output past the cell's output limit was dropped)"
    blocks: list[TextContent | ImageContent] = [text(header)]
    if result.logs.stdout:
        blocks.append(text("[stdout]\n" + cut("".join(result.logs.stdout), "stdout")))
    if result.logs.stderr:
        blocks.append(text("[stderr]\n" + cut("".join(result.logs.stderr), "stderr")))
    for item in result.results:
        blocks.extend(result_content(item))
    error = result.error
    if error is not None:
        trace = "\n".join(error.traceback) if error.traceback else ""
        kind = ("the session's kernel or VM failed" if error.fault else "the code raised an exception")
        blocks.append(text(cut(f"[error] {error.name}: {error.value}\n({kind})" + (f"\n{trace}" if trace else ""),
                               "the traceback")))
    structured = {"session_id": session_id, "new_session": created, "execution_count": result.execution_count,
                  "text": None if result.text is None else cut(result.text, "the result"),
                  "error": None if error is None else {"name": error.name, "value": error.value},
                  "duration_ms": round(result.duration_ms, 1)}
    return CallToolResult(content=blocks, structured_content=structured, is_error=error is not None)


class ProgressRelay:
    """A running cell's stdout and stderr as MCP progress notifications, for a client that asked for
    progress (a progressToken; without one the SDK sends nothing). Output that arrives while a
    notification is on its way is coalesced into the next, each cut at MCP_PROGRESS_LIMIT_CHARS;
    `progress` counts the notifications. The tool's result still carries all of the output."""

    def __init__(self, ctx: Context):
        self._ctx = ctx
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._sent = 0
        self._task = asyncio.ensure_future(self._pump())

    def on_event(self, event: OutputEvent) -> None:
        if event.type in ("stdout", "stderr") and isinstance(event.data, str):
            self._pending.append(event.data)
            self._wake.set()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending:
                chunk, self._pending = "".join(self._pending), []
                self._sent += 1
                try:
                    await self._ctx.report_progress(self._sent, None, cut(chunk, "output", MCP_PROGRESS_LIMIT_CHARS))
                except Exception as exc:  # the client went away: the result says it all anyway
                    log.debug("progress notification failed: %r", exc)
                    return
            if self._closing:
                return

    async def close(self) -> None:
        """Sends what is left (before the result, so the client sees it in order) and stops."""
        self._closing = True
        self._wake.set()
        if not (await asyncio.wait({self._task}, timeout=5))[0]:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class VmcellTools:
    """The tool implementations, on one SessionManager."""

    def __init__(self, manager, template: str = DEFAULT_TEMPLATE):
        self.manager, self.template = manager, template

    async def _session(self, session_id: str | None):
        """(session, created): the one named, or a fresh one of the default template."""
        if session_id is None:
            return await self.manager.create(self.template), True
        return self.manager.get(session_id), False

    @staticmethod
    async def _guarded(work: Awaitable[CallToolResult]) -> CallToolResult:
        try:
            return await work
        except VmcellError as exc:
            log.info("tool call failed: %s: %s", type(exc).__name__, exc)
            return error_result(exc)

    # ---- the tools ----------------------------------------------------------------------------

    async def run_code(
        self,
        code: Annotated[str, Field(description="Python code to run, as one notebook cell (IPython: magics and "
                                               "`!shell` lines work). The value of the last line is returned.")],
        session_id: SessionId = None,
        timeout: Annotated[float | None, Field(gt=0, description=(
            "Seconds before the cell is interrupted (CellTimeout; the session and its variables are kept). "
            "Default: no limit."))] = None,
        ctx: Context | None = None,
    ) -> CallToolResult:
        """Run Python code in a sandboxed microVM session (an IPython kernel) and return what it produced:
        stdout, stderr, the value of the last expression, rich results, and matplotlib figures as images
        (plt.show() or a figure as the last expression). Variables, imports and files persist in the
        session between calls. Without session_id a new session is started and its id is returned: pass
        it to later calls. An exception in the code is returned with its traceback and isError set.
        Output printed while the cell runs is also sent as progress notifications when asked for."""
        return await self._guarded(self._run_code(code, session_id, timeout, ctx))

    async def _run_code(self, code: str, session_id: str | None, timeout: float | None,
                        ctx: Context | None) -> CallToolResult:
        session, created = await self._session(session_id)
        relay = ProgressRelay(ctx) if ctx is not None else None
        try:
            result = await session.execute(code, timeout=timeout, on_event=relay.on_event if relay else None)
        finally:
            if relay is not None:
                await relay.close()
        return execution_content(session.id, created, result)

    async def create_session(
        self,
        template: Annotated[str, Field(description="The template to start from (a built vmcell template).")]
        = DEFAULT_TEMPLATE,
        env: Annotated[dict[str, str] | None, Field(description="Environment variables for the session's code.")]
        = None,
    ) -> CallToolResult:
        """Start a new sandboxed session (a microVM with a Python kernel) and return its session_id. Only
        needed for a template other than the default or for environment variables: run_code without
        session_id starts a session too."""
        return await self._guarded(self._create_session(template, env))

    async def _create_session(self, template: str, env: dict[str, str] | None) -> CallToolResult:
        session = await self.manager.create(template, env=env or None)
        return CallToolResult(content=[text(f"session_id: {session.id} (template {template!r}, hostname "
                                            f"{session.identity.hostname})")],
                              structured_content={"session_id": session.id, "template": template})

    async def close_session(self, session_id: RequiredSessionId) -> CallToolResult:
        """Close a session: its VM is stopped and its variables and files are gone for good."""
        return await self._guarded(self._close_session(session_id))

    async def _close_session(self, session_id: str) -> CallToolResult:
        await self.manager.close(session_id, "closed by an MCP client")
        return CallToolResult(content=[text(f"session {session_id} closed")])

    async def list_sessions(self) -> CallToolResult:
        """List the live sessions: id, template, state (running, or paused/saved: resumed on next use)
        and when each was created and last used (Unix seconds)."""
        sessions = [{"session_id": s.id, "template": s.template.spec.name, "state": s.state.value,
                     "created_at": round(s.created_at, 3), "last_activity": round(s.last_activity, 3)}
                    for s in self.manager.list()]
        lines = [f"{s['session_id']}  {s['template']}  {s['state']}" for s in sessions] or ["no sessions"]
        return CallToolResult(content=[text("\n".join(lines))], structured_content={"sessions": sessions})

    async def read_file(self, path: GuestPath, session_id: SessionId = None) -> CallToolResult:
        """Read a file from a session's guest. UTF-8 text comes back as text, PNG and JPEG files as images,
        other bytes as base64 text."""
        return await self._guarded(self._read_file(path, session_id))

    async def _read_file(self, path: str, session_id: str | None) -> CallToolResult:
        session, created = await self._session(session_id)
        data = await session.read_file(path)
        note = f" (session_id: {session.id}, a new session)" if created else ""
        for mime, magic in IMAGE_MAGIC.items():
            if data.startswith(magic):
                return CallToolResult(content=[text(f"{path}: {mime}, {len(data)} bytes{note}"),
                                               ImageContent(type="image", data=base64.b64encode(data).decode(),
                                                            mime_type=mime)])
        try:
            body = data.decode("utf-8")
            header = f"{path}: {len(data)} bytes of text{note}"
        except UnicodeDecodeError:
            body = base64.b64encode(data).decode()
            header = f"{path}: {len(data)} bytes, not UTF-8 text; base64 below{note}"
        return CallToolResult(content=[text(header), text(cut(body, "the file"))])

    async def write_file(
        self,
        path: GuestPath,
        content: Annotated[str, Field(description="The file's content (text, or base64 with encoding='base64').")],
        session_id: SessionId = None,
        encoding: Annotated[Literal["utf-8", "base64"], Field(description=(
            "How `content` is given: 'utf-8' text (default) or 'base64' for binary data."))] = "utf-8",
    ) -> CallToolResult:
        """Write a file into a session's guest (parent directories are created; an existing file is
        replaced). The code in the session can then open it by the same path."""
        return await self._guarded(self._write_file(path, content, session_id, encoding))

    async def _write_file(self, path: str, content: str, session_id: str | None, encoding: str) -> CallToolResult:
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                return CallToolResult(content=[text("content is not valid base64 (encoding='base64')")],
                                      is_error=True)
        else:
            data = content.encode("utf-8")
        session, created = await self._session(session_id)
        reply = await session.write_file(path, data)
        note = " (a new session: pass this session_id to later calls)" if created else ""
        return CallToolResult(content=[text(f"wrote {reply.get('size')} bytes to {reply.get('path')}\n"
                                            f"session_id: {session.id}{note}")])

    async def run_command(
        self,
        command: Annotated[str | list[str], Field(description=(
            "A shell command line (run with /bin/sh -c), or a program and its arguments as a list."))],
        session_id: SessionId = None,
        timeout: Annotated[float, Field(gt=0, le=MCP_COMMAND_TIMEOUT_MAX_S, description=(
            "Seconds before the command is killed."))] = MCP_COMMAND_TIMEOUT_S,
        stdin: Annotated[str, Field(description="Text fed to the command's standard input.")] = "",
    ) -> CallToolResult:
        """Run a command in a session's guest (Linux; as the user the code runs as, in its home directory)
        and return its exit code, stdout and stderr once it ends. A non-zero exit or a timeout sets isError."""
        return await self._guarded(self._run_command(command, session_id, timeout, stdin))

    async def _run_command(self, command: str | list[str], session_id: str | None, timeout: float,
                           stdin: str) -> CallToolResult:
        if not (command.strip() if isinstance(command, str) else command and command[0]):
            return CallToolResult(content=[text("command is empty: give a shell command line, or a program and "
                                                "its arguments as a list")], is_error=True)
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        session, created = await self._session(session_id)
        run = await session.run(argv, timeout=timeout, stdin=stdin.encode("utf-8"))
        status = f"timed out after {timeout:g} s" if run.timed_out else f"exit code {run.returncode}"
        header = f"{status}\nsession_id: {session.id}" + (" (a new session)" if created else "")
        if run.truncated:
            header += f"\n({', '.join(run.truncated)} cut at the guest's output limit)"
        blocks = [text(header)]
        if run.stdout:
            blocks.append(text("[stdout]\n" + cut(run.stdout.decode("utf-8", errors="replace"), "stdout")))
        if run.stderr:
            blocks.append(text("[stderr]\n" + cut(run.stderr.decode("utf-8", errors="replace"), "stderr")))
        return CallToolResult(content=blocks, structured_content={
            "session_id": session.id, "returncode": run.returncode, "timed_out": run.timed_out},
            is_error=run.timed_out or run.returncode != 0)


TOOLS = ("run_code", "create_session", "close_session", "list_sessions", "read_file", "write_file", "run_command")


def build_mcp_server(manager, template: str = DEFAULT_TEMPLATE) -> MCPServer:
    """An MCP server (the SDK's MCPServer) whose tools act on `manager`'s sessions."""
    server = MCPServer(name="vmcell", version=__version__, instructions=INSTRUCTIONS)
    tools = VmcellTools(manager, template)
    for name in TOOLS:
        method = getattr(tools, name)
        server.add_tool(method, name=name, description=inspect.cleandoc(method.__doc__), structured_output=False)
    return server


# ---- `vmcell mcp`: stdio --------------------------------------------------------------------------


class _StdinLines:
    """Standard input as lines read on the event loop, so that a signal ends the server at once (the
    SDK's own stdin reader blocks a worker thread that a cancellation has to wait for)."""

    def __init__(self, reader: asyncio.StreamReader):
        self._reader = reader

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


async def _stdin_lines():
    """A pipe or socket on stdin (what MCP clients give) read on the loop; None for anything else."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MCP_STDIN_LINE_LIMIT)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):
        return None  # a terminal or a regular file: the SDK's threaded reader
    return _StdinLines(reader)


async def serve_stdio(template: str = DEFAULT_TEMPLATE, max_sessions: int | None = None, build: bool = True) -> None:
    """`vmcell mcp`: MCP over stdin/stdout with a SessionManager of this process. Returns on EOF,
    SIGTERM or SIGINT, after every VM it started is closed. Logs go to stderr; stdout is the protocol."""
    from mcp.server.stdio import stdio_server

    from .config import DEFAULT_MAX_SESSIONS
    from .progress import Progress
    from .sessions import SessionManager
    from .templates import build_template
    from .vm import QemuBackend

    backend = QemuBackend()
    if build:
        await build_template(template, backend, Progress(stream=sys.stderr))  # builds only what is missing
    async with SessionManager(backend, max_sessions=max_sessions or DEFAULT_MAX_SESSIONS) as manager:
        server = build_mcp_server(manager, template)
        lowlevel = server._lowlevel_server  # noqa: SLF001 (MCPServer.run_stdio_async, with our stdin reader)

        async def run() -> None:
            async with stdio_server(stdin=await _stdin_lines()) as (read_stream, write_stream):
                await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        serving, stopping = asyncio.ensure_future(run()), asyncio.ensure_future(stop.wait())
        log.info("MCP on stdio: tools %s; sessions from template %r", ", ".join(TOOLS), template)
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            stopping.cancel()
            if not serving.done():
                serving.cancel()
            await asyncio.gather(serving, stopping, return_exceptions=True)
            if serving.done() and not serving.cancelled() and serving.exception() is not None:
                log.error("the MCP server failed: %r", serving.exception())
        log.info("MCP client gone; closing %d session(s)", len(manager.list()))
