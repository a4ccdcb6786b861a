"""`vmcell bench api`: `1+1` as clients see it, over vmcell's REST API and its gateway websocket,
beside the same cell through jupyter_kernel_gateway on a native kernel (no VM), and through
jupyter_client straight to a native kernel (no HTTP either), in one run.

Both servers run as subprocesses of the benchmark, on loopback, so the gateway columns pay the
same client, HTTP and process-boundary costs; the difference is what the microVM and its link
add. The columns take turns, one cell each per round, so this host's speed drift hits all alike.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import secrets
import socket
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from .bench import Stats
from .config import DEFAULT_TEMPLATE
from .errors import VmcellError

CELL = "1+1"
WARMUP_CELLS = 3  # the first cells after a restore retranslate guest code under TCG
SERVER_START_TIMEOUT_S = 120.0
CELL_TIMEOUT_S = 60.0
NATIVE_KERNEL = "python3"


class BenchError(VmcellError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiClient:
    """Token-authenticated JSON calls and websockets against one server."""

    def __init__(self, port: int, token: str):
        self.base = f"127.0.0.1:{port}"
        self.headers = {"Authorization": f"token {token}"}
        self.http = AsyncHTTPClient()
        self.pid: int | None = None  # the server process, when running_server started it

    async def call(self, method: str, path: str, body: dict | None = None) -> dict | None:
        payload = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        request = HTTPRequest(f"http://{self.base}{path}", method, headers=self.headers, body=payload,
                              request_timeout=SERVER_START_TIMEOUT_S)
        try:
            response = await self.http.fetch(request)
        except HTTPClientError as exc:
            if exc.response is None:
                raise
            raise BenchError(f"{method} {path} on {self.base}: {exc.code} "
                             f"{exc.response.body.decode(errors='replace')[:500]}") from None
        return json.loads(response.body) if response.body else None

    async def channels(self, kernel_id: str) -> WebSocketClientConnection:
        url = f"ws://{self.base}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        return await websocket_connect(HTTPRequest(url, headers=self.headers))


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


@asynccontextmanager
async def running_server(name: str, argv: list[str], port: int, token: str, log_path: Path,
                         cwd: Path | None = None, env: dict[str, str] | None = None):
    """A server subprocess, answering GET /api with the token, killed and reaped on the way out."""
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                                                    cwd=cwd, env=env)
    client = ApiClient(port, token)
    client.pid = proc.pid
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.returncode is not None:
                raise BenchError(f"{name} exited with status {proc.returncode} before answering; "
                                 f"its log ends:\n{_tail(log_path)}")
            try:
                await client.call("GET", "/api")
                break
            except (HTTPClientError, OSError):  # not listening yet; an HTTP answer is final
                if time.monotonic() > deadline:
                    raise BenchError(f"{name} did not answer within {SERVER_START_TIMEOUT_S:.0f} s; "
                                     f"its log ends:\n{_tail(log_path)}") from None
                await asyncio.sleep(0.2)
        yield client
    finally:
        if proc.returncode is None:
            proc.terminate()  # vmcell closes its VMs on SIGTERM
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def _execute_request(code: str, session: str) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    return msg_id, json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench", "session": session,
                   "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    })


async def ws_cell_ms(ws: WebSocketClientConnection, code: str = CELL) -> tuple[float, str | None]:
    """Send to execute_reply-and-idle, as a notebook client waits for a cell; and the result's text."""
    msg_id, frame = _execute_request(code, "bench")
    start = time.perf_counter()
    await ws.write_message(frame)
    replied = idle = False
    text = None
    while not (replied and idle):
        raw = await asyncio.wait_for(ws.read_message(), CELL_TIMEOUT_S)
        if raw is None:
            raise BenchError("the kernel websocket closed mid-cell")
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        replied |= kind == "execute_reply"
        idle |= kind == "status" and msg["content"]["execution_state"] == "idle"
        if kind == "execute_result":
            text = msg["content"]["data"].get("text/plain")
    return (time.perf_counter() - start) * 1000, text


def _check(label: str, text: str | None) -> None:
    if text != "2":
        raise BenchError(f"{label}: `{CELL}` gave {text!r}")


@asynccontextmanager
async def websocket_cells(client: ApiClient, kernel_name: str, label: str):
    """A kernel started through a gateway API; yields a function timing one cell on its websocket."""
    kernel = await client.call("POST", "/api/kernels", {"name": kernel_name})
    try:
        ws = await client.channels(kernel["id"])
        try:
            async def one_cell() -> float:
                ms, text = await ws_cell_ms(ws)
                _check(label, text)
                return ms

            yield one_cell
        finally:
            ws.close()
    finally:
        await client.call("DELETE", f"/api/kernels/{kernel['id']}")


@asynccontextmanager
async def rest_cells(client: ApiClient, template: str, kernel_ms: list[float]):
    """A vmcell session; yields a function timing one POST …/execute (JSON) as the client sees it,
    and appending the kernel round trip the server measured inside it to `kernel_ms`."""
    session = await client.call("POST", "/sessions", {"template": template})
    path = f"/sessions/{session['id']}/execute"
    try:
        async def one_cell() -> float:
            start = time.perf_counter()
            result = await client.call("POST", path, {"code": CELL})
            elapsed = (time.perf_counter() - start) * 1000
            _check("vmcell REST", result["results"][0].get("text") if result["results"] else None)
            kernel_ms.append(result["duration_ms"])
            return elapsed

        one_cell.ipykernel = (await client.call("POST", path, {"code": "import ipykernel; ipykernel.__version__"})
                              )["results"][0]["text"].strip("'")
        yield one_cell
    finally:
        await client.call("DELETE", f"/sessions/{session['id']}")


@asynccontextmanager
async def direct_native_cells():
    """A native kernel driven by jupyter_client over ZMQ, no HTTP: the floor the others sit on."""
    from jupyter_client.manager import start_new_async_kernel

    manager, kernel = await start_new_async_kernel(kernel_name=NATIVE_KERNEL)
    try:
        async def one_cell() -> float:
            texts = []

            def on_output(msg: dict) -> None:
                if msg["msg_type"] == "execute_result":
                    texts.append(msg["content"]["data"].get("text/plain"))

            start = time.perf_counter()
            await kernel.execute_interactive(CELL, output_hook=on_output, timeout=CELL_TIMEOUT_S)
            elapsed = (time.perf_counter() - start) * 1000
            _check("native kernel over ZMQ", texts[0] if texts else None)
            return elapsed

        yield one_cell
    finally:
        kernel.stop_channels()
        await manager.shutdown_kernel(now=True)


async def bench_api(runs: int, template: str = DEFAULT_TEMPLATE, progress=None) -> dict:
    try:
        gateway_version = importlib.metadata.version("jupyter_kernel_gateway")
        native_ipykernel = importlib.metadata.version("ipykernel")
    except importlib.metadata.PackageNotFoundError as exc:
        raise BenchError(f"{exc.name} is not installed: pip install -e '.[bench]'") from None
    with tempfile.TemporaryDirectory(prefix="vmcell-bench-") as logs:
        return await _bench_api(runs, template, Path(logs), progress) | {
            "ipykernel_native": native_ipykernel, "jupyter_kernel_gateway": gateway_version}


async def _bench_api(runs: int, template: str, logs: Path, progress) -> dict:
    token = secrets.token_hex(16)
    vmcell_port, gateway_port = free_port(), free_port()
    vmcell = [sys.executable, "-m", "interpreter.cli", "serve", "--no-build", "--host", "127.0.0.1",
              "--port", str(vmcell_port), "--token", token, "--template", template, "--ephemeral"]
    gateway = [sys.executable, "-m", "jupyter", "kernelgateway", "--KernelGatewayApp.ip=127.0.0.1",
               f"--KernelGatewayApp.port={gateway_port}", f"--KernelGatewayApp.auth_token={token}"]
    rest_kernel_ms: list[float] = []
    async with AsyncExitStack() as stack:
        vm_server = await stack.enter_async_context(
            running_server("vmcell serve", vmcell, vmcell_port, token, logs / "vmcell.log"))
        native_server = await stack.enter_async_context(
            running_server("jupyter kernelgateway", gateway, gateway_port, token, logs / "kernel-gateway.log"))
        accel = (await vm_server.call("GET", "/health"))["accel"]
        rest = await stack.enter_async_context(rest_cells(vm_server, template, rest_kernel_ms))
        columns = {
            "vmcell_rest_ms": rest,
            "vmcell_websocket_ms": await stack.enter_async_context(
                websocket_cells(vm_server, template, "vmcell gateway websocket")),
            "native_gateway_websocket_ms": await stack.enter_async_context(
                websocket_cells(native_server, NATIVE_KERNEL, "jupyter_kernel_gateway websocket")),
            "native_direct_ms": await stack.enter_async_context(direct_native_cells()),
        }
        samples: dict[str, list[float]] = {key: [] for key in columns}
        # Round-robin, one cell per column per round: this host's speed drifts by up to ~1.6x within
        # minutes, and interleaving spreads any drift over all columns alike.
        for round_no in range(WARMUP_CELLS + runs):
            for key, one_cell in columns.items():
                ms = await one_cell()
                if round_no >= WARMUP_CELLS:
                    samples[key].append(ms)
            if progress and round_no >= WARMUP_CELLS and (round_no + 1 - WARMUP_CELLS) % 10 == 0:
                progress(f"{round_no + 1 - WARMUP_CELLS}/{runs} rounds")
    summary = lambda values: {k: Stats(values).summary()[k] for k in ("p50", "p95")}  # noqa: E731
    return {"accel": accel, "runs": runs, "cell": CELL, "ipykernel_guest": rest.ipykernel,
            "vmcell_rest_kernel_ms": summary(rest_kernel_ms[WARMUP_CELLS:])} | {
            key: summary(values) for key, values in samples.items()}
