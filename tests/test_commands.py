"""`sandbox.commands` (E2B's) through a real server and real microVMs: streamed output, exit codes,
timeouts that kill, background handles, the commands' own cgroup, and the raw NDJSON route."""

import asyncio
import json
import time

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from interpreter.client import (
    AsyncSandbox,
    CommandExitException,
    CommandResult,
    Sandbox,
    TimeoutException,
)
from tests.conftest import TOKEN, body

pytestmark = pytest.mark.vm


async def test_sync_commands(api):
    def scenario():
        with Sandbox.create(base_url=api.url, token=TOKEN) as sandbox:
            chunks = []
            result = sandbox.commands.run("echo one; sleep 0.3; echo two >&2; echo three", on_stdout=chunks.append)
            assert isinstance(result, CommandResult) and result.exit_code == 0 and result.error is None
            assert result.stdout == "one\nthree\n" and result.stderr == "two\n"
            assert "".join(chunks) == "one\nthree\n" and len(chunks) >= 2  # streamed as it came, not at the end
            assert sandbox.commands.run("pwd").stdout == "/root\n"
            assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
            assert sandbox.commands.run('printf %s "$GREETING"', envs={"GREETING": "it's \"quoted\"\n"}).stdout \
                == "it's \"quoted\"\n"
            with pytest.raises(CommandExitException) as failed:
                sandbox.commands.run("echo out; echo bad >&2; exit 3")
            assert (failed.value.exit_code, failed.value.stdout, failed.value.stderr) == (3, "out\n", "bad\n")
            assert isinstance(failed.value, CommandResult)
            # Commands live in their own cgroup, outside the kernel's.
            assert "/commands/c" in sandbox.commands.run("cat /proc/self/cgroup").stdout
            # A file a command writes is there for the kernel, and the other way round.
            sandbox.commands.run("echo from-shell > shared.txt")
            assert sandbox.run_code("open('shared.txt').read()").text == "from-shell\\n"

            started = time.monotonic()
            with pytest.raises(TimeoutException):
                sandbox.commands.run("sleep 1000 & sleep 1000", timeout=2)
            assert time.monotonic() - started < 30
            # The timeout killed the whole command, its background child included.
            assert sandbox.commands.run("pgrep -x sleep || true").stdout == ""

            handle = sandbox.commands.run("for i in 1 2 3; do echo $i; sleep 0.2; done", background=True)
            assert isinstance(handle.pid, int) and handle.pid > 1
            assert handle.wait().stdout == "1\n2\n3\n"
            server = sandbox.commands.run("sleep 1000", background=True)
            assert server.kill() is True
            with pytest.raises(CommandExitException) as killed:
                server.wait()
            assert killed.value.exit_code == -9 and killed.value.error == "the command was killed"
            assert server.kill() is False  # not running any more

    await asyncio.to_thread(scenario)


async def test_async_commands_and_the_kernel_restart(api):
    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as sandbox:
        seen = []

        async def on_stdout(data):
            await asyncio.sleep(0.01)
            seen.append(data)

        result = await sandbox.commands.run("echo a; echo b", on_stdout=on_stdout)
        assert result.stdout == "a\nb\n" and "".join(seen) == "a\nb\n"
        with pytest.raises(CommandExitException):
            await sandbox.commands.run("false")
        background = await sandbox.commands.run("sleep 3; echo survived", background=True)
        await sandbox.restart()  # kills the kernel's cgroup, not the commands'
        assert (await background.wait()).stdout == "survived\n"
        handle = await sandbox.commands.run("sleep 1000", background=True)
        assert await handle.kill() is True
        with pytest.raises(CommandExitException):
            await handle.wait()


async def test_commands_rest_ndjson_and_client_leaving(api):
    sid = body(await api("POST", "/sessions", {}))["id"]
    lines = []
    await api("POST", f"/sessions/{sid}/commands", {"cmd": "echo hi; echo err >&2; exit 4"},
              headers={"Accept": "application/x-ndjson"},
              streaming_callback=lambda chunk: lines.extend(json.loads(x) for x in chunk.splitlines() if x.strip()))
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "start" and kinds[-1] == "end" and {"stdout", "stderr"} <= set(kinds)
    assert lines[-1]["exit_code"] == 4 and lines[-1]["timed_out"] is False
    plain = body(await api("POST", f"/sessions/{sid}/commands", {"cmd": "echo plain"}))
    flood = body(await api("POST", f"/sessions/{sid}/commands", {"cmd": "head -c 20000000 /dev/zero | tr '\\0' a"}))
    assert len(flood["stdout"]) == 16 * 2**20 and flood["truncated"] == ["stdout"] and flood["exit_code"] == 0
    assert plain["stdout"] == "plain\n" and plain["exit_code"] == 0 and isinstance(plain["pid"], int)
    for bad in ({}, {"cmd": ""}, {"cmd": 3}, {"cmd": "true", "timeout": -1}, {"cmd": "true", "envs": {"A": 1}}):
        assert (await api("POST", f"/sessions/{sid}/commands", bad)).code == 400, bad
    missing = await api("POST", f"/sessions/{sid}/commands", {"cmd": "true", "cwd": "no/such/dir"})
    assert missing.code == 404
    # A client that goes away mid-command gets the command killed.
    client = AsyncHTTPClient(force_instance=True)
    try:
        with pytest.raises(HTTPClientError):  # our client gives up after 3 s
            await client.fetch(HTTPRequest(f"{api.url}/sessions/{sid}/commands", method="POST",
                                           body=json.dumps({"cmd": "sleep 1000"}), request_timeout=3,
                                           headers={"Authorization": f"token {TOKEN}",
                                                    "Accept": "application/x-ndjson"},
                                           streaming_callback=lambda chunk: None))
    finally:
        client.close()
    for _ in range(50):
        left = body(await api("POST", f"/sessions/{sid}/commands", {"cmd": "pgrep -x sleep || true"}))
        if left["stdout"] == "":
            break
        await asyncio.sleep(0.2)
    assert left["stdout"] == ""
    assert (await api("POST", "/sessions/nope/commands", {"cmd": "true"})).code == 404
    await api("DELETE", f"/sessions/{sid}")
    assert (await api("POST", f"/sessions/{sid}/commands", {"cmd": "true"})).code == 410
