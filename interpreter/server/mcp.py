"""`/mcp`: the MCP tools (interpreter/mcp_server.py) over streamable HTTP, behind the token.

The SDK's streamable-HTTP transport is an ASGI application (StreamableHTTPSessionManager); this
server is Tornado. Three ways were open: reimplement the transport's JSON-RPC over Tornado with the
SDK's types (a second implementation of a protocol that is still moving: the SDK already speaks
two generations of it), run the SDK's manager in JSON-response mode and copy whole bodies, or bridge
ASGI onto Tornado. This is the bridge, streaming both ways, and the SDK's own manager behind it:

- request body: `stream_request_body`; chunks reach the ASGI app as they arrive (the SDK's body
  limit, MCP_MAX_REQUEST_BYTES, answers 413 once it is passed; the rest is read and dropped, so
  that the client gets the 413 rather than a reset connection);
- response: `http.response.start` sets status and headers; every `http.response.body` chunk with
  `more_body` is written and flushed at once (SSE events reach the client as they are produced;
  the flush's future is the back-pressure); the request is finished once the app is done and the
  request body all read;
- a client that hangs up: `receive()` answers `http.disconnect`, which ends the SDK's SSE writers;
  a tool call in progress is then cancelled, and a cell it was running is interrupted as for a REST
  client that went away.

The SDK's manager runs in stateless mode: every POST carries one JSON-RPC exchange answered on its
own response (SSE, so that notifications can precede the result), no MCP session is kept between
requests. vmcell's state is its sessions, named by `session_id` in the tool arguments, and those
outlive a server restart (durable sessions), which stateful MCP sessions would not (clients would
get 404 for their MCP session id and have to start over). It starts with the first /mcp request
(its task group lives in a task of its own) and stops with `close()` (serve() and the tests call
app.close_app). Auth is the server's token (BaseHandler.prepare), checked before anything reaches
the SDK.
"""

from __future__ import annotations

import asyncio
import logging

import tornado.web
from tornado.iostream import StreamClosedError

from ..config import MCP_MAX_REQUEST_BYTES
from .base import BaseHandler

log = logging.getLogger("vmcell.server")

# Per-connection headers are Tornado's to set, not the ASGI app's.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade"}
_DISCONNECT = object()


class McpEndpoint:
    """The SDK's StreamableHTTPSessionManager over the tools, for one Tornado application."""

    def __init__(self, manager):
        self.manager = manager
        self._sdk = None
        self._task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._stop = asyncio.Event()

    async def handle(self, scope, receive, send) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.ensure_future(self._run())
        await asyncio.shield(self._ready)
        await self._sdk.handle_request(scope, receive, send)

    async def _run(self) -> None:
        from mcp.server.transport_security import TransportSecuritySettings

        from ..mcp_server import build_mcp_server

        try:
            server = build_mcp_server(self.manager)
            # MCPServer makes its session manager with its Starlette app (unused: Tornado routes, the
            # bridge calls the manager). No Host/Origin allow list: the server may listen on any
            # address, and a request without the token never gets here (a browser page cannot
            # send it: no cookie carries it).
            server.streamable_http_app(stateless_http=True, max_request_body_size=MCP_MAX_REQUEST_BYTES,
                                       transport_security=TransportSecuritySettings(
                                           enable_dns_rebinding_protection=False))
            self._sdk = server.session_manager
            async with self._sdk.run():
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError("MCP stopped"))
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("the MCP endpoint failed")
            raise

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


@tornado.web.stream_request_body
class McpHandler(BaseHandler):
    """An ASGI bridge: one HTTP request of /mcp, handed to the SDK as it streams in and out."""

    _started = False

    async def prepare(self) -> None:
        super().prepare()  # 401 without the token: nothing reaches the SDK
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._body_done = self._responded = False
        self._gone = asyncio.Event()
        request = self.request
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": request.protocol, "path": request.path,
            "raw_path": request.path.encode("latin-1", errors="replace"),
            "query_string": request.query.encode("latin-1", errors="replace"), "root_path": "",
            "headers": [(name.lower().encode("latin-1"), value.encode("latin-1", errors="replace"))
                        for name, value in request.headers.get_all()],
            "client": (request.remote_ip, 0), "server": None, "state": {},
        }
        endpoint: McpEndpoint = self.settings["vmcell_mcp"]
        self._app = asyncio.ensure_future(endpoint.handle(scope, self._receive, self._send))

    def data_received(self, chunk: bytes) -> None:
        if not self._responded:  # once the SDK answered (say, 413), the rest of the body is dropped
            self._chunks.put_nowait(chunk)

    async def _serve(self) -> None:
        self._chunks.put_nowait(None)  # the body is complete
        try:
            await self._app
        except Exception:
            log.exception("MCP request failed")
            if not self._started:
                raise tornado.web.HTTPError(500, reason="Internal Server Error",
                                            log_message="the MCP request failed (see the server log)") from None
        if not self._finished:
            if not self._started:  # the SDK sent nothing at all
                self.set_status(500)
            self.finish()

    post = get = delete = _serve

    def on_connection_close(self) -> None:
        if hasattr(self, "_gone"):  # not before prepare() got that far (a 401 has nothing to tell)
            self._chunks.put_nowait(_DISCONNECT)
            self._gone.set()

    def on_finish(self) -> None:
        if hasattr(self, "_gone"):
            self._gone.set()  # the exchange is over: an SSE writer still listening may stop

    def compute_etag(self):
        return None  # streamed answers; and a JSON-RPC reply is never cached

    async def _receive(self) -> dict:
        if not self._body_done:
            chunk = await self._chunks.get()
            if chunk is _DISCONNECT:
                self._body_done = True
                return {"type": "http.disconnect"}
            if chunk is None:
                self._body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._started = True
            self.set_status(message["status"])
            self.clear_header("Content-Type")
            for name, value in message.get("headers", ()):
                name = name.decode("latin-1")
                if name.lower() not in HOP_BY_HOP:
                    self.add_header(name, value.decode("latin-1"))
        elif kind == "http.response.body" and not self._finished:
            body = message.get("body", b"")
            if body:
                self.write(body)
            if message.get("more_body", False):
                try:
                    await self.flush()
                except StreamClosedError:
                    raise OSError("the MCP client went away") from None
            else:
                # Finished by _serve, once the request body is all in: an answer sent before that
                # (a 413 as soon as the limit was passed) would make Tornado drop the connection
                # with unread bytes in it, and the client would see a reset instead of the answer.
                self._responded = True


MCP_ROUTES = [(r"/mcp/?", McpHandler)]
