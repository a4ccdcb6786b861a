"""The Jupyter kernel-gateway API: what `jupyter lab --gateway-url=...` and nbclient speak.

A kernel here is a session (one microVM). The channels websocket relays Jupyter messages both ways:
client messages are re-signed with the kernel's key (clients never hold it); every kernel message
goes to every connection of that kernel, and to a bounded buffer for a client that went away, which
it gets back when it reconnects with the same session_id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import datetime, timezone

import orjson
import tornado.web
import tornado.websocket

from .. import __version__
from ..config import DEFAULT_TEMPLATE
from ..errors import TemplateMissing
from ..templates import available_templates
from vmcell_guest.wire import Channel
from .base import BadRequest, BaseHandler, token_matches
from .wsproto import V1_SUBPROTOCOL, FrameError, decode_legacy_binary, decode_legacy_text, decode_v1, encode_legacy, encode_v1

log = logging.getLogger("vmcell.gateway")

CHANNEL_NAMES = {Channel.SHELL: "shell", Channel.IOPUB: "iopub", Channel.STDIN: "stdin", Channel.KCONTROL: "control"}
CLIENT_CHANNEL = {"shell": Channel.SHELL, "stdin": Channel.STDIN, "control": Channel.KCONTROL}
# A client away for longer than this, or missing more than this many messages, starts afresh.
AWAY_BUFFER_S = 120.0
AWAY_BUFFER_MESSAGES = 2000
# Stock notebooks and clients ask for "python3": it means the default template unless one has that name.
JUPYTER_DEFAULT_KERNEL = "python3"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KernelHub:
    """The websocket side of one kernel: live connections and the buffers of absent clients."""

    def __init__(self, session):
        self.session = session
        self.live: dict[str, set["ChannelsHandler"]] = {}
        self.away: dict[str, tuple[float, deque]] = {}
        session.kernel.listeners.append(self._on_message)

    @property
    def connections(self) -> int:
        return sum(len(c) for c in self.live.values())

    def _on_message(self, channel: Channel, msg: dict, raw_parts: list[bytes]) -> None:
        for handlers in self.live.values():
            for handler in handlers:
                handler.send_kernel_message(channel, msg, raw_parts)
        now = time.monotonic()
        for session_id, (since, buffer) in list(self.away.items()):
            if now - since > AWAY_BUFFER_S:
                del self.away[session_id]
            else:
                buffer.append((channel, msg, raw_parts))

    def attach(self, session_id: str, handler: "ChannelsHandler") -> None:
        self.live.setdefault(session_id, set()).add(handler)
        _, missed = self.away.pop(session_id, (0.0, ()))
        for channel, msg, raw_parts in missed:
            handler.send_kernel_message(channel, msg, raw_parts)

    def detach(self, session_id: str, handler: "ChannelsHandler") -> None:
        handlers = self.live.get(session_id, set())
        handlers.discard(handler)
        if not handlers:
            self.live.pop(session_id, None)
            if session_id:
                self.away[session_id] = (time.monotonic(), deque(maxlen=AWAY_BUFFER_MESSAGES))


def hub_for(settings: dict, session) -> KernelHub:
    hubs = settings.setdefault("vmcell_hubs", {})
    hub = hubs.get(session.id)
    if hub is None or hub.session is not session:
        hub = hubs[session.id] = KernelHub(session)
    return hub


def kernel_model(settings: dict, session) -> dict:
    hub = settings.get("vmcell_hubs", {}).get(session.id)
    return {
        "id": session.id,
        "name": session.template.spec.name,
        "last_activity": iso(max(session.last_activity, session.kernel.last_activity)),
        "execution_state": session.kernel.execution_state if session.alive else "dead",
        "connections": hub.connections if hub else 0,
    }


async def kernelspecs(manager) -> dict:
    specs = {}
    # Only built templates can start kernels; the catalog answers without hashing.
    for name, built in (await manager.catalog.ready(available_templates())).items():
        specs[name] = {
            "name": name,
            "spec": {"argv": [], "display_name": f"Python 3 (vmcell {name} microVM)", "language": "python",
                     "interrupt_mode": "signal", "env": {},
                     "metadata": {"vmcell": {"template": name, "accel": built.accel.name,
                                             "description": built.spec.description}}},
            "resources": {},
        }
    return specs


class ApiHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({"version": __version__, "server": "vmcell"})


class KernelSpecsHandler(BaseHandler):
    async def get(self) -> None:
        specs = await kernelspecs(self.manager)
        default = DEFAULT_TEMPLATE if DEFAULT_TEMPLATE in specs else next(iter(specs), DEFAULT_TEMPLATE)
        self.write_json({"default": default, "kernelspecs": specs})


class KernelSpecHandler(BaseHandler):
    async def get(self, name: str) -> None:
        specs = await kernelspecs(self.manager)
        if name not in specs:
            raise TemplateMissing(f"no kernelspec {name!r} (built templates: {', '.join(specs) or 'none'})")
        self.write_json(specs[name])


class KernelSpecResourceHandler(BaseHandler):
    def get(self, name: str, resource: str) -> None:
        raise tornado.web.HTTPError(404, reason="Not Found", log_message=f"kernelspec {name!r} has no resource {resource!r}")


class KernelsHandler(BaseHandler):
    def get(self) -> None:
        self.write_json([kernel_model(self.settings, s) for s in self.manager.list()])

    async def post(self) -> None:
        body = self.json_body()
        name = body.get("name") or DEFAULT_TEMPLATE
        if not isinstance(name, str):
            raise BadRequest("`name` must be a string")
        if name == JUPYTER_DEFAULT_KERNEL and name not in available_templates():
            name = DEFAULT_TEMPLATE
        env = body.get("env") or {}
        if not isinstance(env, dict):
            raise BadRequest("`env` must be an object")
        # Gateway convention: only KERNEL_* variables reach the kernel; the rest is the client's own.
        kernel_env = {k: str(v) for k, v in env.items() if isinstance(k, str) and k.startswith("KERNEL_")}
        session = await self.manager.create(name, env=kernel_env)
        self.write_json(kernel_model(self.settings, session), status=201)


class KernelHandler(BaseHandler):
    def get(self, kernel_id: str) -> None:
        self.write_json(kernel_model(self.settings, self.manager.get(kernel_id)))

    async def delete(self, kernel_id: str) -> None:
        await self.manager.close(kernel_id)
        self.settings.get("vmcell_hubs", {}).pop(kernel_id, None)
        self.set_status(204)
        self.finish()


class KernelInterruptHandler(BaseHandler):
    async def post(self, kernel_id: str) -> None:
        await self.manager.get(kernel_id).interrupt()
        self.set_status(204)
        self.finish()


class KernelRestartHandler(BaseHandler):
    async def post(self, kernel_id: str) -> None:
        session = self.manager.get(kernel_id)
        await session.restart()
        self.write_json(kernel_model(self.settings, session))


class ChannelsHandler(tornado.websocket.WebSocketHandler, BaseHandler):
    """`/api/kernels/{id}/channels?session_id=S`: legacy JSON/binary frames, or v1 when asked."""

    def prepare(self) -> None:
        if not token_matches(self.request, self.settings["vmcell_token"]):
            raise tornado.web.HTTPError(401, reason="Unauthorized", log_message="missing or wrong token")
        self.kernel_session = self.manager.get(self.path_kwargs["kernel_id"])  # 404 before the upgrade
        self.client_session_id = self.get_query_argument("session_id", "")
        self.v1 = False

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        self.v1 = V1_SUBPROTOCOL in subprotocols
        return V1_SUBPROTOCOL if self.v1 else None

    def check_origin(self, origin: str) -> bool:
        return True  # token auth, no cookies: cross-origin pages cannot use a token they do not have

    def open(self, kernel_id: str) -> None:
        self.set_nodelay(True)  # otherwise Nagle + delayed ACK add ~40 ms per round trip
        self.hub = hub_for(self.settings, self.kernel_session)
        self.hub.attach(self.client_session_id, self)

    async def on_message(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                channel, parts = decode_v1(message) if self.v1 else decode_legacy_binary(message)
            else:
                channel, parts = decode_legacy_text(message)
        except FrameError as exc:
            log.warning("kernel %s: dropped a bad client frame: %s", self.kernel_session.id[:8], exc)
            return
        if not self.kernel_session.alive:
            return
        self.kernel_session.touch()
        await self.kernel_session.kernel.forward(CLIENT_CHANNEL[channel], parts)

    def send_kernel_message(self, channel: Channel, msg: dict, raw_parts: list[bytes]) -> None:
        name = CHANNEL_NAMES[channel]
        try:
            if self.v1:
                self.write_message(encode_v1(name, raw_parts), binary=True)
            else:
                frame, binary = encode_legacy(name, msg, raw_parts[4:])
                self.write_message(frame, binary=binary)
        except tornado.websocket.WebSocketClosedError:
            pass

    def on_close(self) -> None:
        hub = getattr(self, "hub", None)
        if hub is not None:
            hub.detach(self.client_session_id, self)


_KID = r"(?P<kernel_id>[^/]+)"
GATEWAY_ROUTES = [
    (r"/api", ApiHandler),
    (r"/api/kernelspecs", KernelSpecsHandler),
    (r"/api/kernelspecs/(?P<name>[^/]+)", KernelSpecHandler),
    (r"/kernelspecs/(?P<name>[^/]+)/(?P<resource>.+)", KernelSpecResourceHandler),
    (r"/api/kernels", KernelsHandler),
    (rf"/api/kernels/{_KID}", KernelHandler),
    (rf"/api/kernels/{_KID}/interrupt", KernelInterruptHandler),
    (rf"/api/kernels/{_KID}/restart", KernelRestartHandler),
    (rf"/api/kernels/{_KID}/channels", ChannelsHandler),
]
