"""REST routes for the sandbox surface beside cells (sessions/surface.py does the work):

  POST /sessions/{id}/commands              {cmd, envs?, cwd?, timeout?} -> the command's end as JSON, or
                                            with `Accept: application/x-ndjson` its events as they come
  POST /sessions/{id}/commands/{cid}/kill   -> {killed}
  GET  /sessions/{id}/files/exists?path=P   -> {path, exists}
  POST /sessions/{id}/files/remove          {path} -> 204
  POST /sessions/{id}/files/dir             {path} -> {path, created}
  POST /sessions/{id}/files/rename          {path, new_path} -> {name, path, type, size}
  GET  /sessions/{id}/metrics               -> {cpu_count, cpu_used_pct, mem_used, mem_total, disk_used,
                                                disk_total, timestamp}

NDJSON lines of a command: {"type": "start", "id", "pid"}, {"type": "stdout"|"stderr", "data"},
{"type": "keepalive"} while it is quiet, and last {"type": "end", "exit_code", "error", "timed_out",
"truncated"}. A client that goes away kills the command.
"""

from __future__ import annotations

import asyncio
import secrets

from tornado.iostream import StreamClosedError

from ..sessions import surface
from .base import BadRequest, BaseHandler, parse_env, parse_typed
from .ndjson import NdjsonHandler



def _event_line(event) -> dict:
    if isinstance(event, surface.CommandStarted):
        return {"type": "start", "id": event.id, "pid": event.pid}
    if isinstance(event, surface.CommandOutput):
        return {"type": event.stream, "data": event.data}
    return {"type": "end", "exit_code": event.exit_code, "error": event.error, "timed_out": event.timed_out,
            "truncated": list(event.truncated)}


class CommandsHandler(NdjsonHandler):
    async def post(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        body = self.json_body()
        cmd = parse_typed(body, "cmd", str)
        if not cmd:
            raise BadRequest("`cmd` is required")
        events = surface.run_command(session, cmd, envs=parse_env(body, "envs"), cwd=parse_typed(body, "cwd", str),
                                     timeout=parse_typed(body, "timeout", (int, float), check=lambda v: v >= 0))
        if not self.wants_ndjson():
            out = {"stdout": [], "stderr": []}
            async for event in events:
                if isinstance(event, surface.CommandOutput):
                    out[event.stream].append(event.data)
                elif isinstance(event, surface.CommandStarted):
                    pid, command_id = event.pid, event.id
                else:
                    end = _event_line(event)
            self.write_json({**end, "id": command_id, "pid": pid, "stdout": "".join(out["stdout"]),
                             "stderr": "".join(out["stderr"])})
            return
        self.start_ndjson()
        if await self.stream_lines(events, _event_line):
            self.finish()  # (a client that left had the command killed by closing its events)


class WatchHandler(NdjsonHandler):
    """POST {path, recursive?}: NDJSON lines start {id}, event {name, event_type}, keepalive; it ends when
    the client leaves or POSTs .../files/watch/{wid}/stop (then the guest's watch ends too)."""

    watches: dict[str, asyncio.Event] = {}

    async def post(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        body = self.json_body()
        path = _path(self, body)
        recursive = parse_typed(body, "recursive", bool, False)
        events = surface.watch_dir(session, path, recursive)
        started = await events.__anext__()  # the guest watches from here on (its errors are this answer's)
        watch_id, stop = secrets.token_hex(8), asyncio.Event()
        WatchHandler.watches[watch_id] = stop
        self.start_ndjson()
        try:
            await self.send_line({"type": "start", "id": watch_id, "path": started.path})
            ended = await self.stream_lines(
                events, lambda e: {"type": "event", "name": e.name, "event_type": e.type}, stop)
        except StreamClosedError:
            ended = False
        finally:
            WatchHandler.watches.pop(watch_id, None)
            await events.aclose()  # the guest's watch ends, the session is no longer in use
        if ended:
            self.finish()


class WatchStopHandler(BaseHandler):
    def post(self, session_id: str, watch_id: str) -> None:
        self.manager.get(session_id)
        stop = WatchHandler.watches.get(watch_id)
        if stop is not None:
            stop.set()
        self.write_json({"stopped": stop is not None})


class CommandKillHandler(BaseHandler):
    async def post(self, session_id: str, command_id: str) -> None:
        self.write_json({"killed": await surface.kill_command(self.manager.get(session_id), command_id)})


def _path(handler: BaseHandler, body: dict | None = None, name: str = "path") -> str:
    value = parse_typed(body, name, str) if body is not None else handler.get_query_argument(name, "")
    if not value:
        raise BadRequest(f"`{name}` is required")
    return value


class FileExistsHandler(BaseHandler):
    async def get(self, session_id: str) -> None:
        path = _path(self)
        self.write_json({"path": path, "exists": await surface.files_exists(self.manager.get(session_id), path)})


class FileRemoveHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        await surface.files_remove(self.manager.get(session_id), _path(self, self.json_body()))
        self.set_status(204)
        self.finish()


class MakeDirHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        path = _path(self, self.json_body())
        created = await surface.files_make_dir(self.manager.get(session_id), path)
        self.write_json({"path": path, "created": created}, status=201 if created else 200)


class RenameHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        body = self.json_body()
        entry = await surface.files_rename(self.manager.get(session_id), _path(self, body), _path(self, body, "new_path"))
        self.write_json(entry)


class MetricsHandler(BaseHandler):
    async def get(self, session_id: str) -> None:
        self.write_json(await surface.metrics(self.manager.get(session_id)))


_ID = r"(?P<session_id>[^/]+)"
SURFACE_ROUTES = [
    (rf"/sessions/{_ID}/commands", CommandsHandler),
    (rf"/sessions/{_ID}/commands/(?P<command_id>[0-9a-f]{{1,64}})/kill", CommandKillHandler),
    (rf"/sessions/{_ID}/files/exists", FileExistsHandler),
    (rf"/sessions/{_ID}/files/remove", FileRemoveHandler),
    (rf"/sessions/{_ID}/files/dir", MakeDirHandler),
    (rf"/sessions/{_ID}/files/rename", RenameHandler),
    (rf"/sessions/{_ID}/files/watch", WatchHandler),
    (rf"/sessions/{_ID}/files/watch/(?P<watch_id>[0-9a-f]{{1,64}})/stop", WatchStopHandler),
    (rf"/sessions/{_ID}/metrics", MetricsHandler),
]
