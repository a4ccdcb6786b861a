"""The REST API over real HTTP on loopback, with real microVMs behind it."""

import asyncio
import json
import time

import pytest
from tests.conftest import TOKEN, body

pytestmark = pytest.mark.vm


async def test_every_endpoint_wants_the_token(api):
    for method, path in [("GET", "/health"), ("GET", "/sessions"), ("POST", "/sessions"), ("GET", "/sessions/x"),
                         ("DELETE", "/sessions/x"), ("POST", "/sessions/x/execute"), ("POST", "/sessions/x/interrupt"),
                         ("POST", "/sessions/x/restart"), ("GET", "/sessions/x/files"),
                         ("GET", "/sessions/x/files/content?path=a"), ("PUT", "/sessions/x/files/content?path=a"),
                         ("GET", "/openapi.json"), ("GET", "/nope")]:
        for token in (None, "wrong"):
            response = await api(method, path, token=token)
            assert response.code == 401, (method, path, token, response.code)
            assert body(response)["reason"] == "Unauthorized"
    ok = await api("GET", "/health", token=None, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.code == 200 and body(ok)["accel"] in ("tcg", "kvm")
    assert (await api("GET", f"/health?token={TOKEN}", token=None)).code == 200


async def test_bad_input_and_unknown_ids_are_clear(api):
    bad = await api("POST", "/sessions", raw=b"{not json")
    assert bad.code == 400 and "JSON" in body(bad)["message"]
    assert (await api("POST", "/sessions", body=[1, 2])).code == 400
    assert (await api("POST", "/sessions", body={"lifetime": "long"})).code == 400
    missing = await api("GET", "/sessions/no-such-id")
    assert missing.code == 404 and "no-such-id" in body(missing)["message"]
    assert (await api("POST", "/sessions/no-such-id/execute", body={"code": "1"})).code == 404
    unknown = await api("POST", "/sessions", body={"template": "nope"})
    assert unknown.code == 404 and "nope" in body(unknown)["message"]
    spec = body(await api("GET", "/openapi.json"))
    assert "/sessions/{session_id}/execute" in spec["paths"]


async def test_session_lifecycle_execute_files_and_limits(api):
    created = await api("POST", "/sessions", body={"env": {"GREETING": "hi"}})
    assert created.code == 201
    sid = body(created)["id"]
    run = await api("POST", f"/sessions/{sid}/execute", body={"code": "import os; x = 20; os.environ['GREETING']"})
    assert body(run)["results"][0]["text"] == "'hi'"
    assert body(await api("POST", f"/sessions/{sid}/execute", body={"code": "x + 1"}))["results"][0]["text"] == "21"
    assert (await api("POST", f"/sessions/{sid}/execute", body={})).code == 400
    assert (await api("POST", f"/sessions/{sid}/execute", body={"code": "1", "env": {"A": 1}})).code == 400
    # files both ways
    put = await api("PUT", f"/sessions/{sid}/files/content?path=data/in.txt", raw=b"from host\n")
    assert put.code == 201 and body(put)["size"] == 10
    read = await api("POST", f"/sessions/{sid}/execute",
                     body={"code": "print(open('data/in.txt').read(), end=''); open('out.bin','wb').write(bytes(range(5)))"})
    assert body(read)["logs"]["stdout"] == ["from host\n"]
    assert (await api("GET", f"/sessions/{sid}/files/content?path=out.bin")).body == bytes(range(5))
    names = [e["name"] for e in body(await api("GET", f"/sessions/{sid}/files?path=."))["entries"]]
    assert "out.bin" in names and "data" in names
    gone = await api("GET", f"/sessions/{sid}/files/content?path=nope.txt")
    assert gone.code == 404 and "nope.txt" in body(gone)["message"]
    # the limit (2 here), then freed by a delete
    other = body(await api("POST", "/sessions"))["id"]
    full = await api("POST", "/sessions")
    assert full.code == 409 and "maximum" in body(full)["message"]
    assert (await api("DELETE", f"/sessions/{other}")).code == 204
    assert (await api("POST", "/sessions")).code == 201
    listed = body(await api("GET", "/sessions"))["sessions"]
    assert sid in [s["id"] for s in listed]


async def test_ndjson_stream_and_a_client_that_drops_it(api):
    sid = body(await api("POST", "/sessions"))["id"]
    lines = []
    await api("POST", f"/sessions/{sid}/execute", headers={"Accept": "application/x-ndjson"},
              body={"code": "import time\nfor i in range(2):\n    print(i, flush=True)\n    time.sleep(0.5)\n7"},
              streaming_callback=lambda chunk: lines.extend(l for l in chunk.split(b"\n") if l))
    events = [json.loads(line) for line in lines]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "execution_count" and kinds[-1] == "end"
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["0\n", "1\n"]
    assert [e["text"] for e in events if e["type"] == "result"] == ["7"]

    await api("POST", f"/sessions/{sid}/execute", body={"code": "kept = 'yes'"})
    # A raw client that starts a long cell and hangs up mid-way.
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    payload = json.dumps({"code": "import time\nprint('start', flush=True)\ntime.sleep(120)"}).encode()
    writer.write(f"POST /sessions/{sid}/execute HTTP/1.1\r\nHost: x\r\nAuthorization: token {TOKEN}\r\n"
                 f"Accept: application/x-ndjson\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    seen = b""
    while b"start" not in seen:
        seen += await asyncio.wait_for(reader.read(4096), 30)
    writer.close()
    dropped_at = time.monotonic()
    after = await api("POST", f"/sessions/{sid}/execute", body={"code": "kept", "timeout": 10})
    assert body(after)["results"][0]["text"] == "'yes'"
    assert time.monotonic() - dropped_at < 2.0 + 1.0  # usable within 2 s (plus the cell itself)


async def test_idle_and_lifetime_reaping(api):
    short = body(await api("POST", "/sessions", body={"lifetime": 0.5}))["id"]
    idle = body(await api("POST", "/sessions", body={"idle_timeout": 60}))["id"]
    await asyncio.sleep(0.6)
    closed = await api.manager.close_expired()
    assert closed == [short]
    expired = await api("GET", f"/sessions/{short}")
    assert expired.code == 410 and "lifetime or idle timeout" in body(expired)["message"]
    assert (await api("GET", f"/sessions/{idle}")).code == 200
