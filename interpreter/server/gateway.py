"""The Jupyter kernel-gateway API: what `jupyter lab --gateway-url=...` and nbclient speak.

A kernel here is a session (one microVM). The channels websocket relays Jupyter messages both ways:
client messages go to the session's cell engine (execute_requests take their turn with every other
cell, with the same output cap and settings; the rest goes straight to the kernel, re-signed with
the kernel's key: clients never hold it). Kernel messages reach the websocket through the session's
ClientChannels (sessions/channels.py), which also keeps what a reconnecting client missed.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import tornado.web
import tornado.websocket

from .. import __version__
from ..config import DEFAULT_TEMPLATE
from vmcell_guest.wire import Channel

from ..errors import TemplateMissing, VmcellError
from ..kernel.router import KernelMessage
from ..templates import available_templates
from .base import BadRequest, BaseHandler, token_matches
from .wsproto import V1_SUBPROTOCOL, FrameError, decode_legacy_binary, decode_legacy_text, decode_v1, encode_legacy, encode_v1

log = logging.getLogger("vmcell.gateway")

CHANNEL_NAMES = {Channel.SHELL: "shell", Channel.IOPUB: "iopub", Channel.STDIN: "stdin", Channel.KCONTROL: "control"}
CLIENT_CHANNEL = {"shell": Channel.SHELL, "stdin": Channel.STDIN, "control": Channel.KCONTROL}
# Stock notebooks and clients ask for "python3": it means the default template unless one has that name.
JUPYTER_DEFAULT_KERNEL = "python3"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def kernel_model(session) -> dict:
    lifecycle = session.kernel.lifecycle
    return {
        "id": session.id,
        "name": session.kernel_name or session.template.spec.name,
        "last_activity": iso(max(session.last_activity, lifecycle.last_activity)),
        "execution_state": lifecycle.execution_state if session.alive else "dead",
        "connections": session.channels.connections,
    }


# Every kernelspec's resources: logo files shipped in the package (interpreter/server/logos/), read
# once at import. The model names them as jupyter_server's kernelspec_model does ("logo-64x64" ->
# /kernelspecs/{name}/logo-64x64.png); jupyter_server's gateway client rewrites that path to its own
# /kernelspecs/... route, which fetches the file from the resource route below.
LOGO_DIR = Path(__file__).parent / "logos"
KERNELSPEC_RESOURCES = {f: (LOGO_DIR / f).read_bytes() for f in ("logo-64x64.png", "logo-32x32.png")}
RESOURCE_CACHE_S = 30 * 24 * 3600  # jupyter_server's max-age for kernelspec PNGs


def spec_resources(name: str) -> dict[str, str]:
    return {Path(f).stem: f"/kernelspecs/{name}/{f}" for f in KERNELSPEC_RESOURCES}


def python_kernelspec(name: str, built, alias_of: str | None = None) -> dict:
    """The kernelspec model of one built Python template; `alias_of` (the template's name) when `name`
    is another name for it (python3), whose display name says which template it starts."""
    template = alias_of or name
    display = f"Python 3 (vmcell {template} microVM)" if alias_of is None else \
        f"Python 3 (vmcell {template} microVM, as {name})"
    return {
        "name": name,
        "spec": {"argv": [], "display_name": display, "language": "python",
                 "interrupt_mode": "signal", "env": {},
                 "metadata": {"vmcell": {"template": template, "accel": built.accel.name,
                                         "description": built.spec.description}}},
        "resources": spec_resources(name),
    }


def kernel_template(name: str, templates) -> str:
    """The template a kernel name starts: the alias python3 means the default template, unless a
    template has that name."""
    return DEFAULT_TEMPLATE if name == JUPYTER_DEFAULT_KERNEL and name not in templates else name


async def kernelspecs(manager) -> dict:
    specs = {}
    # Only built templates can start kernels; the catalog answers without hashing.
    built_templates = await manager.catalog.ready(available_templates())
    for name, built in built_templates.items():
        specs[name] = python_kernelspec(name, built)
    if JUPYTER_DEFAULT_KERNEL not in specs and DEFAULT_TEMPLATE in built_templates:
        specs[JUPYTER_DEFAULT_KERNEL] = python_kernelspec(JUPYTER_DEFAULT_KERNEL, built_templates[DEFAULT_TEMPLATE],
                                                          alias_of=DEFAULT_TEMPLATE)
    return specs


class KernelApiHandler(BaseHandler):
    gone_status = 404  # Jupyter's convention for a kernel that is no more (see BaseHandler)


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
    """`/kernelspecs/{name}/{file}`: a kernelspec's logo (what jupyter_server's gateway client fetches)."""

    async def get(self, name: str, resource: str) -> None:
        specs = await kernelspecs(self.manager)
        if name not in specs or f"/kernelspecs/{name}/{resource}" not in specs[name]["resources"].values():
            raise tornado.web.HTTPError(404, reason="Not Found",
                                        log_message=f"kernelspec {name!r} has no resource {resource!r}")
        self.set_header("Content-Type", "image/png")
        self.set_header("Cache-Control", f"max-age={RESOURCE_CACHE_S}")
        self.finish(KERNELSPEC_RESOURCES[resource])


class KernelsHandler(KernelApiHandler):
    def get(self) -> None:
        self.write_json([kernel_model(s) for s in self.manager.list()])

    async def post(self) -> None:
        body = self.json_body()
        name = body.get("name") or DEFAULT_TEMPLATE
        if not isinstance(name, str):
            raise BadRequest("`name` must be a string")
        template = kernel_template(name, available_templates())
        env = body.get("env") or {}
        if not isinstance(env, dict):
            raise BadRequest("`env` must be an object")
        # Gateway convention: only KERNEL_* variables reach the kernel; the rest is the client's own.
        kernel_env = {k: str(v) for k, v in env.items() if isinstance(k, str) and k.startswith("KERNEL_")}
        session = await self.manager.create(template, env=kernel_env, kernel_name=name if name != template else None)
        self.write_json(kernel_model(session), status=201)


class KernelHandler(KernelApiHandler):
    def get(self, kernel_id: str) -> None:
        self.write_json(kernel_model(self.manager.get(kernel_id)))

    async def delete(self, kernel_id: str) -> None:
        await self.manager.close(kernel_id, "kernel shut down by a gateway client")
        self.set_status(204)
        self.finish()


class KernelInterruptHandler(KernelApiHandler):
    async def post(self, kernel_id: str) -> None:
        await self.manager.get(kernel_id).interrupt()
        self.set_status(204)
        self.finish()


class KernelRestartHandler(KernelApiHandler):
    async def post(self, kernel_id: str) -> None:
        session = self.manager.get(kernel_id)
        await session.restart()
        self.write_json(kernel_model(session))


class ChannelsHandler(tornado.websocket.WebSocketHandler, KernelApiHandler):
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
        if self.kernel_session.gone is not None:  # ended between the upgrade and now
            self.close_for(1001, str(self.kernel_session.gone)[:120])
            return
        self.kernel_session.channels.attach(self.client_session_id, self)

    async def on_message(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                channel, parts = decode_v1(message) if self.v1 else decode_legacy_binary(message)
            else:
                channel, parts = decode_legacy_text(message)
        except FrameError as exc:
            log.warning("kernel %s: dropped a bad client frame: %s", self.kernel_session.id[:8], exc)
            return
        self.kernel_session.touch()
        try:
            await self.kernel_session.ensure_running()  # a paused or saved kernel comes back first
            await self.kernel_session.engine.submit_client_message(CLIENT_CHANNEL[channel], parts)
        except VmcellError as exc:  # the session ended (its websockets are being closed) or the link failed
            log.info("kernel %s: client message not delivered: %s", self.kernel_session.id[:8], exc)

    def send_kernel_message(self, message: KernelMessage) -> None:
        name = CHANNEL_NAMES[message.channel]
        try:
            if self.v1:
                self.write_message(encode_v1(name, message.raw_parts), binary=True)
            else:
                frame, binary = encode_legacy(name, message.msg, message.raw_parts[4:])
                self.write_message(frame, binary=binary)
        except tornado.websocket.WebSocketClosedError:
            pass

    def close_for(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def on_close(self) -> None:
        self.kernel_session.channels.detach(self.client_session_id, self)


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
