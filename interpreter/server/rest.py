"""REST API for tool loops: sessions, cells (JSON or an NDJSON stream), interrupt, restart, files,
and the lifecycle (pause to disk, resume, fork, a new timeout).

Handlers parse, call the session layer, and shape the answer; nothing here knows about VMs or Jupyter.
"""

from __future__ import annotations

from .. import __version__
from ..config import DEFAULT_TEMPLATE
from ..vm.accel import host_accelerator
from .base import BadRequest, BaseHandler, parse_env, parse_typed
from .contexts import parse_cell_context
from .ndjson import NdjsonHandler
from .openapi import OPENAPI


def session_info(session) -> dict:
    """What the API says about a session (Session.info: one definition for every door)."""
    return session.info()


class HealthHandler(BaseHandler):
    def get(self) -> None:
        accel = host_accelerator()
        confinement = getattr(self.manager.backend, "confinement", None)
        self.write_json({"status": "ok", "version": __version__, "accel": accel.name,
                         "sessions": len(self.manager.list()), "max_sessions": self.manager.max_sessions,
                         # what this server restores sessions from, and whether its sources changed since
                         "templates": self.manager.catalog.status(),
                         # what each VM's QEMU runs under (interpreter/jail/), and why any part is off
                         "confinement": confinement.as_dict() if confinement else None})


class OpenAPIHandler(BaseHandler):
    def get(self) -> None:
        self.write_json(OPENAPI)


class SessionsHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({"sessions": [session_info(s) for s in self.manager.list()]})

    async def post(self) -> None:
        body = self.json_body()
        positive = lambda v: v > 0  # noqa: E731
        session = await self.manager.create(
            parse_typed(body, "template", str, DEFAULT_TEMPLATE),
            env=parse_env(body),
            lifetime=parse_typed(body, "lifetime", (int, float), check=positive),
            idle_timeout=parse_typed(body, "idle_timeout", (int, float), check=positive),
            network=body.get("network"),  # checked by the manager (InvalidNetwork: 400) before any VM starts
        )
        self.write_json(session_info(session), status=201)


class SessionHandler(BaseHandler):
    def get(self, session_id: str) -> None:
        self.write_json(session_info(self.manager.get(session_id)))

    async def delete(self, session_id: str) -> None:
        await self.manager.close(session_id)
        self.set_status(204)
        self.finish()


class ExecuteHandler(NdjsonHandler):
    """POST {code, timeout?, env?, context? | language?}. JSON result, or with `Accept: application/x-ndjson` one event
    per line (keepalive lines while the cell is quiet, an `end` line last). A client that goes away
    mid-cell gets its cell interrupted; the session stays usable."""

    async def post(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        body = self.json_body()
        code = parse_typed(body, "code", str)
        if code is None:
            raise BadRequest("`code` is required")
        timeout = parse_typed(body, "timeout", (int, float), check=lambda v: v > 0)
        env = parse_env(body)
        where = parse_cell_context(body)  # a code context: `context` (id) or `language` (contexts.py)
        if not self.wants_ndjson():
            result = await session.execute(code, timeout=timeout, env=env, **where)
            self.write_json(result.to_dict())
            return
        events = session.stream(code, timeout=timeout, env=env, **where)  # 400/404 before the stream starts
        self.start_ndjson()
        if await self.stream_lines(events, lambda event: event.to_dict()):
            self.finish()  # (a client that left had its cell interrupted by the stream's cleanup)


class InterruptHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        await self.manager.get(session_id).interrupt()
        self.set_status(204)
        self.finish()


class RestartHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        await session.restart()
        self.write_json(session_info(session))


class PauseHandler(BaseHandler):
    """POST: saved to disk, its RAM freed (state `saved`); any later request on it resumes it."""

    async def post(self, session_id: str) -> None:
        self.write_json(session_info(await self.manager.pause(session_id)))


class ResumeHandler(BaseHandler):
    """POST: back to `running` (a no-op for a running session)."""

    async def post(self, session_id: str) -> None:
        self.write_json(session_info(await self.manager.resume(session_id)))


class ForkHandler(BaseHandler):
    """POST {count?: n (default 1), timeout?: seconds}: n new sessions with the parent's memory,
    kernel and files at one instant, each its own machine; the parent keeps running. The manager
    refuses a count past its limit (400). `timeout` closes each child that many seconds from now."""

    async def post(self, session_id: str) -> None:
        body = self.json_body()
        count = body.get("count")
        count = 1 if count is None else count
        if not isinstance(count, int) or isinstance(count, bool):
            raise BadRequest("`count` must be an integer")
        if count < 1:
            raise BadRequest("`count` must be at least 1")
        timeout = parse_typed(body, "timeout", (int, float), check=lambda v: v > 0)
        children = await self.manager.fork(session_id, count)
        if timeout is not None:
            children = [self.manager.set_timeout(child.id, timeout) for child in children]
        self.write_json({"sessions": [session_info(child) for child in children]}, status=201)


class TimeoutHandler(BaseHandler):
    """POST {timeout: seconds}: the session is closed that many seconds from now (E2B's set_timeout)."""

    def post(self, session_id: str) -> None:
        timeout = parse_typed(self.json_body(), "timeout", (int, float), check=lambda v: v > 0)
        if timeout is None:
            raise BadRequest("`timeout` (seconds, > 0) is required")
        self.write_json(session_info(self.manager.set_timeout(session_id, timeout)))


class FilesHandler(BaseHandler):
    """GET ?path=DIR lists a directory (default: home)."""

    async def get(self, session_id: str) -> None:
        path = self.get_query_argument("path", ".")
        entries = await self.manager.get(session_id).list_files(path)
        self.write_json({"path": path, "entries": entries})


class FileContentHandler(BaseHandler):
    """GET ?path=FILE downloads raw bytes; PUT ?path=FILE uploads the raw request body."""

    def _path(self) -> str:
        path = self.get_query_argument("path", "")
        if not path:
            raise BadRequest("`path` query argument is required")
        return path

    async def get(self, session_id: str) -> None:
        data = await self.manager.get(session_id).read_file(self._path())
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(data)

    async def put(self, session_id: str) -> None:
        reply = await self.manager.get(session_id).write_file(self._path(), self.request.body)
        self.write_json({"path": reply.get("path"), "size": reply.get("size")}, status=201)


_ID = r"(?P<session_id>[^/]+)"
ROUTES = [
    (r"/health", HealthHandler),
    (r"/openapi.json", OpenAPIHandler),
    (r"/sessions", SessionsHandler),
    (rf"/sessions/{_ID}", SessionHandler),
    (rf"/sessions/{_ID}/execute", ExecuteHandler),
    (rf"/sessions/{_ID}/interrupt", InterruptHandler),
    (rf"/sessions/{_ID}/restart", RestartHandler),
    (rf"/sessions/{_ID}/pause", PauseHandler),
    (rf"/sessions/{_ID}/resume", ResumeHandler),
    (rf"/sessions/{_ID}/fork", ForkHandler),
    (rf"/sessions/{_ID}/timeout", TimeoutHandler),
    (rf"/sessions/{_ID}/files", FilesHandler),
    (rf"/sessions/{_ID}/files/content", FileContentHandler),
]
