"""The Jupyter kernel-gateway API against real microVMs: REST, and the channels websocket."""

import asyncio
import io
import json
import uuid

import pytest
from PIL import Image
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect, WebSocketError
from tornado.httpclient import HTTPClientError

from interpreter.server.wsproto import V1_SUBPROTOCOL, encode_v1
from tests.conftest import TOKEN, body

pytestmark = pytest.mark.vm


def execute_request(code, session="test", allow_stdin=False):
    msg_id = uuid.uuid4().hex
    return msg_id, {
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": session,
                   "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": allow_stdin, "stop_on_error": True},
    }


async def connect(api, kernel_id, session_id="s1", subprotocols=None, token=TOKEN):
    url = f"ws://127.0.0.1:{api.port}/api/kernels/{kernel_id}/channels?session_id={session_id}"
    headers = {"Authorization": f"token {token}"} if token else {}
    return await websocket_connect(HTTPRequest(url, headers=headers), subprotocols=subprotocols)


async def collect(ws, msg_id, decode=json.loads, timeout=60):
    """Messages whose parent is msg_id, until the kernel is idle again after replying."""
    got, replied, idle = [], False, False
    while not (replied and idle):
        raw = await asyncio.wait_for(ws.read_message(), timeout)
        assert raw is not None, "websocket closed"
        msg = decode(raw)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        got.append(msg)
        replied |= msg["msg_type"] == "execute_reply"
        idle |= msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
    return got


async def test_kernelspecs_and_kernels_rest(api):
    specs = body(await api("GET", "/api/kernelspecs"))
    assert specs["default"] == "python" and specs["kernelspecs"]["python"]["spec"]["language"] == "python"
    assert body(await api("GET", "/api/kernelspecs/python"))["name"] == "python"
    assert (await api("GET", "/api/kernelspecs/nope")).code == 404
    # python3 (what stock notebooks name) is listed as an alias of the default template
    alias = specs["kernelspecs"]["python3"]
    assert alias["name"] == "python3" and alias["spec"]["metadata"]["vmcell"]["template"] == "python"
    assert "python microVM" in alias["spec"]["display_name"] and specs["default"] in specs["kernelspecs"]
    assert body(await api("GET", "/api/kernelspecs/python3")) == alias
    for name in ("python", "python3"):
        resources = specs["kernelspecs"][name]["resources"]
        assert resources == {"logo-64x64": f"/kernelspecs/{name}/logo-64x64.png",
                             "logo-32x32": f"/kernelspecs/{name}/logo-32x32.png"}
        for size, path in ((64, resources["logo-64x64"]), (32, resources["logo-32x32"])):
            logo = await api("GET", path)
            assert logo.code == 200 and logo.headers["Content-Type"] == "image/png"
            assert Image.open(io.BytesIO(logo.body)).size == (size, size)
    assert (await api("GET", "/kernelspecs/python/logo-64x64.png", token=None)).code == 401
    assert (await api("GET", "/kernelspecs/python/kernel.js")).code == 404
    assert (await api("GET", "/kernelspecs/python/../../pyproject.toml")).code == 404
    assert (await api("GET", "/kernelspecs/nope/logo-64x64.png")).code == 404
    assert body(await api("GET", "/api"))["server"] == "vmcell"
    created = await api("POST", "/api/kernels", body={"name": "python", "env": {"KERNEL_X": "x1", "OTHER": "no"}})
    assert created.code == 201
    model = body(created)
    uuid.UUID(model["id"], version=4)
    assert model["execution_state"] in ("idle", "starting") and model["last_activity"].endswith("Z")
    assert [k["id"] for k in body(await api("GET", "/api/kernels"))] == [model["id"]]
    session = api.manager.get(model["id"])
    env = await session.execute("import os; (os.environ.get('KERNEL_X'), os.environ.get('OTHER'))")
    assert env.text == "('x1', None)"
    assert (await api("POST", f"/api/kernels/{model['id']}/interrupt")).code == 204
    assert body(await api("POST", f"/api/kernels/{model['id']}/restart"))["id"] == model["id"]
    assert (await api("DELETE", f"/api/kernels/{model['id']}")).code == 204
    # a kernel started as python3 runs the default template and keeps the name it was asked for
    alias_kernel = body(await api("POST", "/api/kernels", body={"name": "python3"}))
    assert alias_kernel["name"] == "python3" and api.manager.get(alias_kernel["id"]).template.spec.name == "python"
    assert [k["name"] for k in body(await api("GET", "/api/kernels"))] == ["python3"]
    assert (await api("DELETE", f"/api/kernels/{alias_kernel['id']}")).code == 204
    missing = await api("GET", f"/api/kernels/{model['id']}")
    assert missing.code == 404 and model["id"] in body(missing)["message"]
    assert (await api("POST", "/api/kernels", raw=b"nope")).code == 400


async def test_websocket_needs_the_token(api):
    kernel_id = body(await api("POST", "/api/kernels", body={}))["id"]
    with pytest.raises((HTTPClientError, WebSocketError)) as err:
        await connect(api, kernel_id, token=None)
    assert getattr(err.value, "code", 401) == 401
    url = f"ws://127.0.0.1:{api.port}/api/kernels/{kernel_id}/channels?token={TOKEN}"
    ws = await websocket_connect(url)  # the `?token=` convention
    ws.close()


async def test_legacy_protocol_execute_stdin_and_reconnect(api):
    kernel_id = body(await api("POST", "/api/kernels", body={}))["id"]
    ws = await connect(api, kernel_id, session_id="alpha")
    msg_id, request = execute_request("x = 6; print('out'); x * 7")
    await ws.write_message(json.dumps(request))
    msgs = await collect(ws, msg_id)
    types = [m["msg_type"] for m in msgs]
    assert "execute_input" in types and types.count("execute_reply") == 1
    assert any(m["msg_type"] == "stream" and m["content"]["text"] == "out\n" for m in msgs)
    assert any(m["msg_type"] == "execute_result" and m["content"]["data"]["text/plain"] == "42" for m in msgs)
    assert all(m["channel"] in ("shell", "iopub") for m in msgs)

    # stdin: input() works over the websocket
    msg_id, request = execute_request("name = input('who? '); name.upper()", allow_stdin=True)
    await ws.write_message(json.dumps(request))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.read_message(), 60))
        if msg["msg_type"] == "input_request":
            assert msg["channel"] == "stdin" and msg["content"]["prompt"] == "who? "
            break
    reply_id = uuid.uuid4().hex
    await ws.write_message(json.dumps({
        "channel": "stdin", "header": {"msg_id": reply_id, "msg_type": "input_reply", "session": "alpha",
                                       "username": "t", "date": "2026-01-01T00:00:00Z", "version": "5.3"},
        "parent_header": msg["header"], "metadata": {}, "content": {"value": "vm"}}))
    msgs = await collect(ws, msg_id)
    assert any(m["msg_type"] == "execute_result" and m["content"]["data"]["text/plain"] == "'VM'" for m in msgs)

    # the client goes away; what arrives meanwhile waits for it under the same session_id
    ws.close()
    await asyncio.sleep(0.2)
    late = await api.manager.get(kernel_id).execute("print('while away')")
    assert late.logs.stdout == ["while away\n"]
    ws = await connect(api, kernel_id, session_id="alpha")
    texts = []
    while "while away\n" not in texts:
        msg = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])
    ws.close()


async def test_v1_subprotocol(api):
    kernel_id = body(await api("POST", "/api/kernels", body={}))["id"]
    ws = await connect(api, kernel_id, subprotocols=[V1_SUBPROTOCOL])
    assert ws.selected_subprotocol == V1_SUBPROTOCOL
    msg_id, request = execute_request("21 * 2")
    parts = [json.dumps(request[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
    await ws.write_message(encode_v1("shell", parts), binary=True)

    def decode(frame):
        import struct
        n = struct.unpack_from("<Q", frame, 0)[0]
        offsets = list(struct.unpack_from("<" + "Q" * n, frame, 8))
        pieces = [frame[a:b] for a, b in zip(offsets, offsets[1:])]
        header, parent, metadata, content = (json.loads(p) for p in pieces[1:5])
        return {"channel": pieces[0].decode(), "msg_type": header["msg_type"], "header": header,
                "parent_header": parent, "content": content}

    msgs = await collect(ws, msg_id, decode=decode)
    assert any(m["msg_type"] == "execute_result" and m["content"]["data"]["text/plain"] == "42" for m in msgs)
    ws.close()
