import asyncio
import json
import os

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer

from interpreter.bench_api import free_port
from interpreter.config import DEFAULT_TEMPLATE
from interpreter.progress import Progress
from interpreter.server import close_app, make_app
from interpreter.sessions import SessionManager

TOKEN = "test-token"


@pytest.fixture(scope="session")
def built_template():
    """The default template, built if missing (minutes the first time under TCG; cached after)."""
    from interpreter.templates import build_template
    from interpreter.vm import QemuBackend

    return asyncio.run(build_template(DEFAULT_TEMPLATE, QemuBackend(), Progress()))


@pytest.fixture
async def manager(built_template):
    async with SessionManager() as m:
        yield m


def body(response):
    return json.loads(response.body)


def qemu_pids(root=None) -> set[int]:
    """QEMUs of this VMCELL_HOME (their sockets live in its run directory), or of `root` (a state
    dir): other checkouts' tests and servers on the same machine start and stop VMs of their own."""
    from interpreter.config import run_dir

    ours = str(root or run_dir()).encode()
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                if b"qemu-system" in argv[0] and any(ours in arg for arg in argv):
                    pids.add(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture
async def api(built_template, request, tmp_path):
    """A real vmcell server on loopback (max 2 sessions), and a small client for it.

    Options by indirect parametrization, e.g. `@pytest.mark.parametrize("api", [{"max_sessions": 4,
    "lifecycle": {"auto_pause_s": None, "state_dir": "tmp"}}], indirect=True)`: `lifecycle` holds
    LifecycleSettings fields (state_dir "tmp": a fresh directory of the test's); `metrics_public`:
    /metrics without the token."""
    options = dict(getattr(request, "param", None) or {})
    manager_args = {"max_sessions": options.pop("max_sessions", 2)}
    metrics_public = options.pop("metrics_public", False)
    if "lifecycle" in options:
        from interpreter.sessions.settings import LifecycleSettings

        fields = dict(options.pop("lifecycle"))
        if fields.get("state_dir") == "tmp":
            fields["state_dir"] = tmp_path / "sessions"
        manager_args["lifecycle"] = LifecycleSettings(**fields)
    assert not options, f"unknown api options {options}"
    port = free_port()
    async with SessionManager(**manager_args) as manager:
        app = make_app(manager, TOKEN, metrics_public)
        server = HTTPServer(app)
        server.listen(port, "127.0.0.1")
        client = AsyncHTTPClient(force_instance=True)

        async def call(method, path, body=None, token=TOKEN, headers=None, raw=None, **kw):
            hdrs = {"Authorization": f"token {token}"} if token else {}
            hdrs.update(headers or {})
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            if method in ("POST", "PUT") and data is None:
                data = b""
            request = HTTPRequest(f"http://127.0.0.1:{port}{path}", method=method, body=data, headers=hdrs,
                                  request_timeout=120, **kw)
            try:
                return await client.fetch(request)
            except HTTPClientError as exc:
                return exc.response

        call.port, call.manager, call.url = port, manager, f"http://127.0.0.1:{port}"
        yield call
        client.close()
        server.stop()
        await close_app(app)
        # Durable sessions would outlive the manager (its shutdown leaves them for a next server).
        await manager.close_all("the test is over")
