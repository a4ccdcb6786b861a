"""The Tornado application and `vmcell serve`."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

from ..config import DEFAULT_MAX_SESSIONS, vmcell_home
from ..sessions import SessionManager
from ..sessions.settings import LifecycleSettings
from ..templates import available_templates
from .base import BaseHandler
from .gateway import GATEWAY_ROUTES
from .mcp import MCP_ROUTES, McpEndpoint
from .metrics import METRICS_ROUTES
from .rest import ROUTES

log = logging.getLogger("vmcell.server")
REAP_EVERY_S = 5.0
MAX_BODY_BYTES = 24 * 1024 * 1024  # file uploads are capped at 16 MiB by the guest; JSON bodies are small


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()  # 401 before 404: unauthenticated callers learn nothing about routes
        raise tornado.web.HTTPError(404, reason="Not Found", log_message=f"no route for {self.request.path}")


def make_app(manager: SessionManager, token: str, metrics_public: bool = False) -> tornado.web.Application:
    """`metrics_public`: /metrics answers without the token (`vmcell serve --metrics-public`)."""
    return tornado.web.Application(
        ROUTES + GATEWAY_ROUTES + METRICS_ROUTES + MCP_ROUTES, default_handler_class=NotFoundHandler,
        vmcell_manager=manager, vmcell_token=token, websocket_ping_interval=30,
        vmcell_metrics_public=metrics_public, vmcell_mcp=McpEndpoint(manager),
    )


async def close_app(app: tornado.web.Application) -> None:
    """Stops what the app runs besides its handlers (the MCP endpoint's SDK session manager)."""
    await app.settings["vmcell_mcp"].close()


def load_or_create_token() -> str:
    """Generated once and kept under VMCELL_HOME (0600), so clients keep working across restarts."""
    path = vmcell_home() / "token"
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def describe_lifecycle(lifecycle: LifecycleSettings) -> str:
    """One line for the log: how this server's sessions live."""
    seconds = lambda value: "off" if value is None else f"{value:g} s"  # noqa: E731
    pool = ", ".join(f"{name}={count}" for name, count in lifecycle.pool.items()) or "off"
    where = (f"sessions outlive the server (registry in {lifecycle.state_dir})" if lifecycle.state_dir
             else "sessions end with the server (--ephemeral)")
    return (f"pool {pool}; auto-pause {seconds(lifecycle.auto_pause_s)}; "
            f"save to disk after {seconds(lifecycle.save_after_s)} paused; {where}")


async def serve(host: str, port: int, token: str | None, max_sessions: int = DEFAULT_MAX_SESSIONS,
                ready: asyncio.Event | None = None, lifecycle: LifecycleSettings | None = None,
                metrics_public: bool = False) -> None:
    """`lifecycle`: the pool, auto-pause, save-to-disk and the state directory (default: the
    LifecycleSettings defaults, i.e. ephemeral sessions, auto-paused after a minute idle)."""
    token = token or load_or_create_token()
    lifecycle = lifecycle if lifecycle is not None else LifecycleSettings()
    async with SessionManager(max_sessions=max_sessions, lifecycle=lifecycle) as manager:
        # Pin the builds served from now on (later edits of their sources do not change them), and
        # watch for such edits: /health and the log then say that a rebuild and a restart are pending.
        await manager.catalog.preload(available_templates())
        manager.catalog.start_watching()
        app = make_app(manager, token, metrics_public)
        server = HTTPServer(app, max_body_size=MAX_BODY_BYTES, idle_connection_timeout=3600)
        server.listen(port, host)
        reaper = PeriodicCallback(manager.close_expired, REAP_EVERY_S * 1000)
        reaper.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"vmcell: serving on http://{host}:{port}\nvmcell: token {token}\n"
              f"vmcell: sessions: {describe_lifecycle(lifecycle)}", flush=True)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            reaper.stop()
            server.stop()
            await close_app(app)
            log.info("shutting down: %s %d sessions", "leaving" if manager.durable else "closing", len(manager.list()))
