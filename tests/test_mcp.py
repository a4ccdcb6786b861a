"""The MCP tools through the official SDK's own client: over stdio (`vmcell mcp` as a subprocess) and
over streamable HTTP against a live vmcell server (/mcp), with real microVMs behind both."""

import asyncio
import base64
import io
import json
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ImageContent, TextContent
from PIL import Image

from interpreter.mcp_server import TOOLS
from tests.conftest import TOKEN

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parent.parent
PLOT = "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.show()"


def texts(result) -> list[str]:
    return [block.text for block in result.content if isinstance(block, TextContent)]


def images(result) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(block.data))) for block in result.content
            if isinstance(block, ImageContent)]


def session_id_of(result) -> str:
    sid = result.structured_content["session_id"]
    assert f"session_id: {sid}" in texts(result)[0]
    return sid


async def exercise(client: ClientSession) -> set[str]:
    """What both transports must do; returns the ids of the sessions it left open (none)."""
    await client.initialize()
    assert {tool.name for tool in (await client.list_tools()).tools} == set(TOOLS)

    first = await client.call_tool("run_code", {"code": "x = 41\n1 + 1"})
    assert not first.is_error, texts(first)
    assert "[result]\n2" in texts(first) and first.structured_content["text"] == "2"
    sid = session_id_of(first)
    assert first.structured_content["new_session"] is True

    # the same session again: its variables are there
    again = await client.call_tool("run_code", {"code": "print('x is', x)\nx + 1", "session_id": sid})
    assert not again.is_error and "[stdout]\nx is 41\n" in texts(again) and "[result]\n42" in texts(again)
    assert again.structured_content["new_session"] is False

    plot = await client.call_tool("run_code", {"code": PLOT, "session_id": sid})
    assert not plot.is_error, texts(plot)
    [image] = images(plot)
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100

    # output streams as progress notifications while the cell runs, before the result
    progress = []

    async def on_progress(value, total, message):
        progress.append((time.monotonic(), value, message))

    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(1)\n'done'"
    streamed = await client.call_tool("run_code", {"code": code, "session_id": sid}, progress_callback=on_progress)
    ended = time.monotonic()
    assert "[stdout]\n0\n1\n2\n" in texts(streamed) and "[result]\n'done'" in texts(streamed)
    assert "".join(message for _, _, message in progress) == "0\n1\n2\n", progress
    assert [value for _, value, _ in progress] == list(range(1, len(progress) + 1))
    assert progress[0][0] < ended - 1.5, "the first line came only with the result: not streamed"

    failed = await client.call_tool("run_code", {"code": "1 / 0", "session_id": sid})
    assert failed.is_error
    assert any(t.startswith("[error] ZeroDivisionError: division by zero") for t in texts(failed))
    assert failed.structured_content["error"]["name"] == "ZeroDivisionError"

    # files both ways, with code in between
    wrote = await client.call_tool("write_file", {"session_id": sid, "path": "data/in.txt", "content": "héllo\n"})
    assert not wrote.is_error, texts(wrote)
    code = "s = open('data/in.txt').read(); open('out.txt', 'w').write(s.upper()); len(s)"
    assert "[result]\n6" in texts(await client.call_tool("run_code", {"code": code, "session_id": sid}))
    read = await client.call_tool("read_file", {"session_id": sid, "path": "out.txt"})
    assert not read.is_error and texts(read)[1] == "HÉLLO\n"
    raw = bytes(range(256))
    wrote = await client.call_tool("write_file", {"session_id": sid, "path": "blob.bin", "encoding": "base64",
                                                  "content": base64.b64encode(raw).decode()})
    assert not wrote.is_error
    read = await client.call_tool("read_file", {"session_id": sid, "path": "blob.bin"})
    assert base64.b64decode(texts(read)[1]) == raw and "not UTF-8" in texts(read)[0]
    missing = await client.call_tool("read_file", {"session_id": sid, "path": "nope.txt"})
    assert missing.is_error and "GuestFileNotFound" in texts(missing)[0]

    # commands, as a shell line and as argv
    shell = await client.call_tool("run_command", {"session_id": sid, "command": "wc -c < out.txt; echo oops >&2"})
    assert not shell.is_error and texts(shell)[0].startswith("exit code 0")
    assert "[stdout]\n7\n" in texts(shell) and "[stderr]\noops\n" in texts(shell)
    argv = await client.call_tool("run_command", {"session_id": sid, "command": ["cat"], "stdin": "piped"})
    assert "[stdout]\npiped" in texts(argv)
    fails = await client.call_tool("run_command", {"session_id": sid, "command": "exit 3"})
    assert fails.is_error and texts(fails)[0].startswith("exit code 3")

    listed = await client.call_tool("list_sessions", {})
    assert sid in [s["session_id"] for s in listed.structured_content["sessions"]]

    # a bad session id is a clear tool error, not a protocol error
    bad = await client.call_tool("run_code", {"code": "1", "session_id": "no-such-session"})
    assert bad.is_error and texts(bad)[0].startswith("SessionNotFound: no session with id 'no-such-session'")
    assert "list_sessions" in texts(bad)[0]

    closed = await client.call_tool("close_session", {"session_id": sid})
    assert not closed.is_error
    gone = await client.call_tool("run_code", {"code": "x", "session_id": sid})
    assert gone.is_error and texts(gone)[0].startswith("SessionClosed: ")
    left = await client.call_tool("list_sessions", {})
    return {s["session_id"] for s in left.structured_content["sessions"]}


def children_of(pid: int) -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                found[int(entry)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@asynccontextmanager
async def stdio_server_process():
    params = StdioServerParameters(command=sys.executable, args=["-m", "interpreter.cli", "mcp", "--no-build"],
                                   env=dict(os.environ), cwd=str(REPO))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as client:
            yield client


async def test_stdio_tools_and_reaping(built_template):
    qemus: dict[int, str] = {}
    async with stdio_server_process() as client:
        assert await exercise(client) == set()
        # one more session left open: the server must close it when the client goes away
        kept = await client.call_tool("run_code", {"code": "import os; os.getpid()"})
        assert not kept.is_error
        [server] = [pid for pid, cmd in children_of(os.getpid()).items() if "interpreter.cli mcp" in cmd]
        qemus = {pid: cmd for pid, cmd in children_of(server).items() if "qemu-system" in cmd}
        assert len(qemus) == 1, qemus
    # EOF on its stdin: the server closed its sessions and exited
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in [server, *qemus]) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not alive(server) and not any(alive(pid) for pid in qemus)


async def test_stdio_sigterm_reaps_vms(built_template):
    async with stdio_server_process() as client:
        await client.initialize()
        assert not (await client.call_tool("run_code", {"code": "1"})).is_error
        [server] = [pid for pid, cmd in children_of(os.getpid()).items() if "interpreter.cli mcp" in cmd]
        qemus = [pid for pid, cmd in children_of(server).items() if "qemu-system" in cmd]
        assert qemus
        os.kill(server, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in [server, *qemus]) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not alive(server) and not any(alive(pid) for pid in qemus)


@asynccontextmanager
async def http_client(api, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120, read=300)) as http:
        async with streamable_http_client(f"{api.url}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as client:
                yield client


async def test_http_tools_on_a_live_server(api):
    async with http_client(api) as client:
        assert await exercise(client) == set()
        # sessions made through MCP are the server's sessions: the REST API sees them too
        made = await client.call_tool("create_session", {"env": {"GREETING": "hi"}})
        sid = made.structured_content["session_id"]
        assert (await api("GET", f"/sessions/{sid}")).code == 200
        greeting = await client.call_tool("run_code", {"code": "import os; os.environ['GREETING']", "session_id": sid})
        assert "[result]\n'hi'" in texts(greeting)
        assert not (await client.call_tool("close_session", {"session_id": sid})).is_error
    assert api.manager.list() == []


async def test_http_mcp_wants_the_token(api):
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    for token in (None, "wrong"):
        response = await api("POST", "/mcp", raw=body, token=token, headers=headers)
        assert response.code == 401
        assert (await api("GET", "/mcp", token=token)).code == 401
    with pytest.raises(Exception):
        async with http_client(api, token="wrong") as client:
            await client.initialize()
    # a body past the limit is refused as such
    from interpreter.config import MCP_MAX_REQUEST_BYTES

    huge = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "' + b"a" * MCP_MAX_REQUEST_BYTES + b'"}}'
    assert (await api("POST", "/mcp", raw=huge, headers=headers)).code == 413
    # with it, a raw JSON-RPC ping is answered, whatever name the server was reached by
    ok = await api("POST", "/mcp", raw=body, headers={**headers, "Host": "vmcell.example:8890"})
    assert ok.code == 200 and ok.headers["Content-Type"].startswith("text/event-stream")
    assert '"id":1,"result":{' in ok.body.decode()


async def test_http_client_that_hangs_up_mid_cell_gets_it_interrupted(api):
    """The bridge tells the SDK when the client goes away: the tool call is cancelled and the cell
    interrupted, as for a REST client that leaves; the session stays usable."""
    sid = json.loads((await api("POST", "/sessions", body={})).body)["id"]
    session = api.manager.get(sid)
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "run_code", "arguments": {"code": "import time; time.sleep(120)", "session_id": sid}}}
    headers = {"Authorization": f"token {TOKEN}", "Accept": "application/json, text/event-stream"}

    async def post() -> None:
        async with httpx2.AsyncClient(timeout=300) as http:
            async with http.stream("POST", f"{api.url}/mcp", json=call, headers=headers) as response:
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    pass

    task = asyncio.ensure_future(post())
    deadline = time.monotonic() + 60
    while not session.engine.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert session.engine.busy, "the cell never started"
    await asyncio.sleep(0.5)
    task.cancel()  # the client hangs up
    await asyncio.gather(task, return_exceptions=True)
    deadline = time.monotonic() + 30
    while session.engine.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not session.engine.busy, "the cell kept running after its client left"
    ran = await api("POST", f"/sessions/{sid}/execute", body={"code": "6 * 7"})
    assert json.loads(ran.body)["results"][0]["text"] == "42"
