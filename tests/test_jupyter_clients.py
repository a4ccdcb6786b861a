"""Real Jupyter clients using vmcell kernels: jupyter_server in gateway mode, and nbclient."""

import asyncio
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.conftest import TOKEN, free_port
from tests.test_gateway import collect, execute_request

pytestmark = pytest.mark.vm


@asynccontextmanager
async def running_jupyter(api, tmp_path, module: str, *args: str, root=None, env_extra: dict | None = None,
                          start_timeout_s: float = 120.0):
    """`python -m <module>` (jupyter_server, jupyterlab) in gateway mode in front of the vmcell server
    `api`, on a free loopback port with config, data and runtime dirs of the test's; yields a
    token-authenticated `call(method, path, body)` (with .port, .url, .token); stopped on the way out
    (SIGTERM, SIGKILL after 30 s)."""
    port, token = free_port(), "jupyter-side-token"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), **(env_extra or {}))
    log_path = tmp_path / f"{module}.log"
    log = open(log_path, "wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root or tmp_path}",
        f"--gateway-url={api.url}", f"--GatewayClient.auth_token={TOKEN}", *args,
        *(["--allow-root"] if os.geteuid() == 0 else []),
        env=env, stdout=log, stderr=log)
    client = AsyncHTTPClient(force_instance=True)

    async def call(method, path, body=None):
        request = HTTPRequest(f"http://127.0.0.1:{port}{path}", method=method, headers={"Authorization": f"token {token}"},
                              body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
                              request_timeout=120)
        try:
            return await client.fetch(request)
        except HTTPClientError as exc:
            if exc.response is None:
                raise
            return exc.response

    try:
        deadline = time.monotonic() + start_timeout_s  # a cold start on a loaded host takes a while
        while True:
            try:
                if (await call("GET", "/api/status")).code == 200:
                    break
            except (ConnectionError, OSError):
                pass
            if proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"{module} did not start: " + log_path.read_text()[-2000:])
            await asyncio.sleep(0.1)
        call.port, call.url, call.token = port, f"http://127.0.0.1:{port}", token
        yield call
    finally:
        client.close()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


@pytest.fixture
async def jupyter_server(api, tmp_path):
    async with running_jupyter(api, tmp_path, "jupyter_server", start_timeout_s=60) as call:
        yield call


async def test_jupyter_server_in_gateway_mode_runs_cells_in_a_vmcell_vm(api, jupyter_server):
    created = await jupyter_server("POST", "/api/kernels", {"name": "python"})
    assert created.code == 201, created.body
    kernel_id = json.loads(created.body)["id"]
    assert api.manager.get(kernel_id).alive  # the kernel is a vmcell session: one microVM
    url = f"ws://127.0.0.1:{jupyter_server.port}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {jupyter_server.token}"}))

    msg_id, request = execute_request("import socket; kept = 5; (socket.gethostname()[:7], kept * 2)")
    await ws.write_message(json.dumps(request))
    msgs = await collect(ws, msg_id)
    result = next(m for m in msgs if m["msg_type"] == "execute_result")
    assert result["content"]["data"]["text/plain"] == "('vmcell-', 10)"

    msg_id, request = execute_request("import time; time.sleep(60)")
    await ws.write_message(json.dumps(request))
    await asyncio.sleep(2)
    assert (await jupyter_server("POST", f"/api/kernels/{kernel_id}/interrupt")).code == 204
    msgs = await collect(ws, msg_id, timeout=30)
    assert any(m["msg_type"] == "error" and m["content"]["ename"] == "KeyboardInterrupt" for m in msgs)

    restart_at = time.monotonic()
    assert (await jupyter_server("POST", f"/api/kernels/{kernel_id}/restart")).code == 200
    msg_id, request = execute_request("import sys; 'numpy' in sys.modules")  # the template's imports: warm again
    await ws.write_message(json.dumps(request))
    msgs = await collect(ws, msg_id)
    # 6.1 s before the kernel fork server; a generous sanity bound (`vmcell bench exec` gives restart_ms)
    assert time.monotonic() - restart_at < 4.0
    assert next(m for m in msgs if m["msg_type"] == "execute_result")["content"]["data"]["text/plain"] == "True"
    msg_id, request = execute_request("kept")
    await ws.write_message(json.dumps(request))
    msgs = await collect(ws, msg_id)
    assert any(m["msg_type"] == "error" and m["content"]["ename"] == "NameError" for m in msgs)
    ws.close()
    assert (await jupyter_server("DELETE", f"/api/kernels/{kernel_id}")).code == 204
    assert not api.manager.list()


NOTEBOOKS = sorted((Path(__file__).parent.parent / "examples" / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
async def test_nbclient_runs_the_example_notebooks_through_the_gateway(api, path):
    import nbformat

    from interpreter.jupyter_gateway import execute_notebook

    nb = nbformat.read(path, as_version=4)
    # nbclient's client is synchronous underneath (websocket-client): run it off the loop serving vmcell.
    await asyncio.to_thread(execute_notebook, nb, api.url, TOKEN, timeout=300)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], outputs
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not api.manager.list()  # nbclient shut its kernel (VM) down
