"""Network egress with real microVMs (TCG): off by default; with an allow list, the guest reaches
exactly what the list names through the host's proxy, and injected secrets stay on the host.
Every server here is a loopback server of the test."""

import asyncio
import base64
import hashlib
import io
import json
import logging
import zipfile

import pytest

from tests.conftest import body

pytestmark = pytest.mark.vm

SECRET = "Bearer vmcell-test-secret-7f3a9c"


class LoopbackWeb:
    """A tiny HTTP server on 127.0.0.1 that serves `routes` and records every request head."""

    def __init__(self, routes: dict[str, tuple[str, bytes]] | None = None):
        self.routes = routes or {}
        self.requests: list[str] = []

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests.append(head)
        path = head.split(" ")[1]
        kind, payload = self.routes.get(path, ("text/plain", b"hello from the host " + path.encode()))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (kind.encode(), len(payload))
                     + payload)
        await writer.drain()
        writer.close()

    def close(self):
        self.server.close()


async def run(session, code: str, timeout: float = 120) -> str:
    result = await session.execute(code, timeout=timeout)
    assert result.error is None, result.error
    return "".join(result.logs.stdout)


def wheel(name: str, version: str, source: str) -> tuple[str, bytes]:
    """A minimal pure-Python wheel, RECORD with hashes."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": source.encode(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: vmcell-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{dist}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in {**files, f"{dist}/RECORD": record.encode()}.items():
            z.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


PROBE = r"""
import json, os, socket, urllib.request, urllib.error
out = {"env": {k: v for k, v in os.environ.items() if "proxy" in k.lower()},
       "pip_conf": os.path.exists("/etc/pip.conf"), "nics": sorted(os.listdir("/sys/class/net")),
       "routes": open("/proc/net/route").read().splitlines()[1:]}
def attempt(fn):
    try:
        return {"ok": fn()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode(errors="replace"), "rule": e.headers.get("X-Vmcell-Rule")}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
def fetch(url, headers={}):
    return lambda: urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30).read().decode()
def raw(host, port):
    def go():
        socket.create_connection((host, port), timeout=5).close()
        return "connected"
    return go
"""


async def test_without_network_there_is_no_way_out(manager):
    web = await LoopbackWeb().start()
    try:
        session = await manager.create()
        assert session.network is None and session.egress is None and session.info()["network"] is None
        out = json.loads(await run(session, PROBE + f"""
out["loopback"] = attempt(fetch("http://127.0.0.1:{web.port}/x"))
out["gateway"] = attempt(raw("10.0.2.2", {web.port}))
out["dns"] = attempt(lambda: socket.getaddrinfo("pypi.org", 443))
out["listener"] = attempt(raw("127.0.0.1", 3128))
print(json.dumps(out))"""))
        assert out["env"] == {} and not out["pip_conf"]
        assert out["nics"] == ["lo"] and out["routes"] == []
        for name in ("loopback", "gateway", "dns", "listener"):
            assert "error" in out[name], (name, out[name])
        assert web.requests == []
    finally:
        web.close()


async def test_allow_list_proxy_pip_and_injected_secret(manager, caplog):
    name, data = wheel("vmcell_nettest", "1.0", "VALUE = 42\n")
    digest = hashlib.sha256(data).hexdigest()
    index = f'<html><body><a href="/files/{name}#sha256={digest}">{name}</a></body></html>'.encode()
    allowed = await LoopbackWeb({"/simple/vmcell-nettest/": ("text/html", index),
                                 f"/files/{name}": ("application/octet-stream", data)}).start()
    other = await LoopbackWeb().start()
    api = await LoopbackWeb().start()
    # localhost is allowed on `other`'s port, but resolves to loopback there, which no ip:port entry allows.
    # (On `allowed`'s port it would pass: an entry names 127.0.0.1:that port exactly.)
    network = {"allow": [f"127.0.0.1:{allowed.port}", f"localhost:{other.port}",
                         {"host": f"127.0.0.1:{api.port}", "headers": {"Authorization": SECRET}}]}
    try:
        session = await manager.create(network=network)
        info = json.dumps(session.info())
        assert SECRET not in info and "<redacted>" in info
        with caplog.at_level(logging.WARNING, logger="vmcell.network"):
            out = json.loads(await run(session, PROBE + f"""
out["allowed"] = attempt(fetch("http://127.0.0.1:{allowed.port}/a"))
out["other"] = attempt(fetch("http://127.0.0.1:{other.port}/b"))
out["localhost"] = attempt(fetch("http://localhost:{other.port}/c"))
out["metadata"] = attempt(fetch("http://169.254.169.254/latest/meta-data/"))
out["https_other"] = attempt(fetch("https://127.0.0.1:{other.port}/"))
out["gateway"] = attempt(raw("10.0.2.2", {allowed.port}))
out["dns"] = attempt(lambda: socket.getaddrinfo("pypi.org", 443))
out["api"] = attempt(fetch("http://127.0.0.1:{api.port}/v1", {{"Authorization": "guest-own-value"}}))
print(json.dumps(out))"""))
        proxy = "http://127.0.0.1:3128"
        assert out["env"] == {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy}
        assert out["pip_conf"] and out["nics"] == ["lo"] and out["routes"] == []
        assert out["allowed"] == {"ok": "hello from the host /a"}
        assert out["other"]["status"] == 403 and out["other"]["rule"] == "not-allowed"
        assert f"127.0.0.1:{other.port} is not on this session's network allow list" in out["other"]["body"]
        assert out["localhost"].get("status") == 403 and out["localhost"]["rule"] == "internal-address", out["localhost"]
        assert "localhost resolves to" in out["localhost"]["body"] and "loopback" in out["localhost"]["body"]
        assert out["metadata"]["status"] == 403
        assert "403" in out["https_other"]["error"]  # CONNECT refused too
        assert "error" in out["gateway"] and "error" in out["dns"]
        assert other.requests == []  # the second loopback server saw nothing, by IP or by name
        assert [r.split(" ")[1] for r in allowed.requests] == ["/a"]
        refusals = [r.getMessage() for r in caplog.records if "egress refused" in r.getMessage()]
        assert len(refusals) == 4 and all(session.id in m for m in refusals), refusals
        assert any("not-allowed" in m for m in refusals) and any("internal-address" in m for m in refusals)

        # The injected secret: the server got it (instead of the guest's own value); the guest never sees it.
        assert out["api"] == {"ok": "hello from the host /v1"}
        assert len(api.requests) == 1 and f"Authorization: {SECRET}\r\n" in api.requests[0]
        assert "guest-own-value" not in api.requests[0]
        seen = await run(session, "import os, subprocess\nprint(repr(dict(os.environ)))\n"
                                  "print(subprocess.run(['sh', '-c', 'cat /etc/pip.conf; env'], capture_output=True, "
                                  "text=True).stdout)")
        assert SECRET not in seen and "vmcell-test-secret" not in json.dumps(out)

        # pip, through the proxy, from the test's index.
        pip = await run(session, f"""
import subprocess, sys
r = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir",
                    "--index-url", "http://127.0.0.1:{allowed.port}/simple", "--trusted-host", "127.0.0.1",
                    "vmcell-nettest"], capture_output=True, text=True)
print(r.returncode, r.stdout[-1500:], r.stderr[-1500:])
import vmcell_nettest
print("VALUE", vmcell_nettest.VALUE)""", timeout=400)
        assert pip.startswith("0 ") and "VALUE 42" in pip, pip
        assert f"/files/{name}" in [r.split(" ")[1] for r in allowed.requests]
    finally:
        for server in (allowed, other, api):
            server.close()


async def test_forks_and_restored_sessions_keep_their_network(manager):
    web = await LoopbackWeb().start()
    try:
        parent = await manager.create(network={"allow": [f"127.0.0.1:{web.port}"]})
        fetch = f"import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{web.port}/{{}}', timeout=30).read().decode())"
        assert "/p1" in await run(parent, fetch.format("p1"))
        [child] = await manager.fork(parent.id)
        assert child.network == parent.network and child.egress is not None and child.egress is not parent.egress
        assert "/c1" in await run(child, fetch.format("c1"))
        await manager.close(child.id)
        await manager.pause(parent.id)  # saved to disk: QEMU quits, the egress goes with it
        assert parent.egress is None
        assert "/p2" in await run(parent, fetch.format("p2"))  # restored from disk, egress reattached
        assert [r.split(" ")[1] for r in web.requests] == ["/p1", "/c1", "/p2"]
    finally:
        web.close()


async def test_rest_network_validation_and_redaction(api):
    for bad in ({"allow": ["127.0.0.1"]}, {"allow": "x"}, "yes", {"allow": [{"host": "a.com", "headers": {"Host": "b"}}]}):
        response = await api("POST", "/sessions", {"network": bad})
        assert response.code == 400, (bad, response.code)
        assert "network" in body(response)["message"]
    assert api.manager.list() == []
    created = await api("POST", "/sessions", {"network": {"allow": ["pypi.org", {"host": "api.example.com",
                                                                                 "headers": {"X-Key": SECRET}}]}})
    assert created.code == 201, created.body
    sid = body(created)["id"]
    shown = await api("GET", f"/sessions/{sid}")
    assert body(shown)["network"] == {"allow": ["pypi.org", {"host": "api.example.com",
                                                             "headers": {"X-Key": "<redacted>"}}]}
    assert SECRET.encode() not in shown.body and SECRET.encode() not in (await api("GET", "/sessions")).body
    assert body(await api("POST", "/sessions", {}))["network"] is None  # python's default: none


async def test_pooled_and_adopted_sessions_get_their_network(built_template, tmp_path):
    from interpreter.sessions import SessionManager
    from interpreter.sessions.settings import LifecycleSettings

    web = await LoopbackWeb().start()
    fetch = f"import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{web.port}/{{}}', timeout=30).read().decode())"
    state_dir = tmp_path / "sessions"
    first = SessionManager(lifecycle=LifecycleSettings(auto_pause_s=None, state_dir=state_dir, pool={"python": 1}))
    second = None
    try:
        await first.start()
        for _ in range(600):
            if first.pool.ready("python"):
                break
            await asyncio.sleep(0.1)
        pooled = first.pool._ready["python"][0]
        assert pooled.egress is None  # a pool VM has no network until it is taken
        session = await first.create(network={"allow": [f"127.0.0.1:{web.port}"]})
        assert session is pooled and session.egress is not None
        assert "/pool" in await run(session, fetch.format("pool"))
        await first.shutdown()  # durable: the VM is left running for the next server
        second = SessionManager(lifecycle=LifecycleSettings(auto_pause_s=None, state_dir=state_dir))
        await second.start()
        adopted = second.get(session.id)
        assert adopted.network == session.network and adopted.egress is not None
        assert "/adopted" in await run(adopted, fetch.format("adopted"))
        assert [r.split(" ")[1] for r in web.requests] == ["/pool", "/adopted"]
    finally:
        web.close()
        for manager in (second, first):
            if manager is not None:
                await manager.close_all("the test is over")
                await manager.shutdown()
