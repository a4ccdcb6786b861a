"""Pause, resume, fork and timeouts over a real server and the SDK, with real microVMs."""

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from interpreter.client import AsyncSandbox, NotFoundError, Sandbox, SessionGoneError
from interpreter.config import MAX_FORK_COUNT
from tests.conftest import TOKEN, body
from tests.test_sdk import readme_block

pytestmark = pytest.mark.vm

# Sessions kept on disk in the test's own directory; no auto-pause, so every state is the test's doing.
DURABLE = {"lifecycle": {"auto_pause_s": None, "state_dir": "tmp"}}


@pytest.mark.parametrize("api", [DURABLE], indirect=True)
async def test_pause_connect_and_run_three_times_keeps_variables_and_files(api):
    def scenario():
        opts = {"base_url": api.url, "token": TOKEN}
        sandbox = Sandbox.create(**opts)
        sandbox_id, hostname = sandbox.sandbox_id, sandbox.get_info().hostname
        assert sandbox.run_code("history = []").error is None
        for cycle in range(3):
            sandbox.files.write(f"host-{cycle}.txt", f"from the host, cycle {cycle}")
            assert sandbox.run_code(f"history.append({cycle}); open('kernel-{cycle}.txt', 'w').write('k{cycle}')"
                                    ).error is None
            assert sandbox.pause() == sandbox_id
            (listed,) = [info for info in Sandbox.list(**opts) if info.sandbox_id == sandbox_id]
            assert listed.state == "saved", listed
            sandbox = Sandbox.connect(sandbox_id, **opts)
            info = sandbox.get_info()
            assert (info.state, info.hostname) == ("running", hostname), info
            assert sandbox.run_code("history").text == repr(list(range(cycle + 1)))
            for earlier in range(cycle + 1):
                assert sandbox.files.read(f"host-{earlier}.txt") == f"from the host, cycle {earlier}"
                assert sandbox.files.read(f"kernel-{earlier}.txt") == f"k{earlier}"
        sandbox.pause()
        assert sandbox.run_code("len(history)").text == "3"  # any request brings a saved sandbox back
        sandbox.set_timeout(120)
        info = sandbox.get_info()
        assert info.state == "running" and 100 < (info.end_at - datetime.now(timezone.utc)).total_seconds() <= 120
        sandbox.kill()
        return sandbox_id

    sandbox_id = await asyncio.to_thread(scenario)
    with pytest.raises(SessionGoneError, match="was closed"):
        await asyncio.to_thread(Sandbox.connect, sandbox_id, base_url=api.url, token=TOKEN)
    assert not api.manager.list()


@pytest.mark.parametrize("api", [{"max_sessions": 3, **DURABLE}], indirect=True)
async def test_fork_children_start_from_the_parents_state_and_go_their_own_way(api):
    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as parent:
        assert (await parent.run_code("import random; x = 41")).error is None
        await parent.files.write("shared.txt", "from the parent")
        children = await parent.fork(count=2)
        try:
            assert len({parent.sandbox_id, *(child.sandbox_id for child in children)}) == 3
            for child in children:
                assert (await child.run_code("x + 1")).text == "42"
                assert await child.files.read("shared.txt") == "from the parent"
            await children[0].run_code("x = 0")
            assert (await children[1].run_code("x")).text == "41" and (await parent.run_code("x")).text == "41"
            hostnames = {(await sandbox.get_info()).hostname for sandbox in (parent, *children)}
            assert len(hostnames) == 3  # each child is its own machine
            draws = {(await child.run_code("random.random()")).text for child in children}
            assert len(draws) == 2, draws  # reseeded: clones do not share a random stream
        finally:
            for child in children:
                await child.kill()


@pytest.mark.parametrize("api", [{"max_sessions": 3, **DURABLE}], indirect=True)
async def test_the_readme_lifecycle_example_runs_as_written(api, monkeypatch):
    monkeypatch.setenv("VMCELL_URL", api.url)
    monkeypatch.setenv("VMCELL_TOKEN", TOKEN)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        await asyncio.to_thread(exec, compile(readme_block("sandbox.pause()"), "README.md", "exec"), {})
    assert out.getvalue().splitlines() == ["saved", "42", "41 41"], out.getvalue()
    assert not api.manager.list()


@pytest.mark.parametrize("api", [{"max_sessions": MAX_FORK_COUNT + 2}], indirect=True)
async def test_lifecycle_requests_for_unknown_and_closed_sessions_and_bad_input(api):
    for action in ("pause", "resume", "fork", "timeout"):
        missing = await api("POST", f"/sessions/no-such-id/{action}", body={"timeout": 5})
        assert missing.code == 404 and "no-such-id" in body(missing)["message"], action
    sid = body(await api("POST", "/sessions"))["id"]
    for count in (0, "x", True, MAX_FORK_COUNT + 1):
        refused = await api("POST", f"/sessions/{sid}/fork", body={"count": count})
        assert refused.code == 400 and body(refused)["message"], (count, body(refused))
    for bad in ({}, {"timeout": 0}, {"timeout": "soon"}):
        assert (await api("POST", f"/sessions/{sid}/timeout", body=bad)).code == 400
    assert len(api.manager.list()) == 1  # nothing was forked
    assert (await api("DELETE", f"/sessions/{sid}")).code == 204
    for action in ("pause", "resume", "fork", "timeout"):
        gone = await api("POST", f"/sessions/{sid}/{action}", body={"timeout": 5})
        assert gone.code == 410 and "was closed" in body(gone)["message"], action
    with pytest.raises(NotFoundError):
        await AsyncSandbox.connect("no-such-id", base_url=api.url, token=TOKEN)
    with pytest.raises(SessionGoneError):
        await AsyncSandbox.connect(sid, base_url=api.url, token=TOKEN)


def test_bench_lifecycle_reports_every_figure(built_template):
    done = subprocess.run([sys.executable, "-m", "interpreter.cli", "bench", "lifecycle", "--sessions", "3",
                           "--runs", "2", "--idle-window", "1", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accel"] in ("tcg", "kvm") and result["sessions"] == 3
    for key in ("pool_take_ms", "pool_first_cell_ms", "pool_take_to_first_cell_ms", "restore_ms", "pause_ms",
                "resume_ms", "save_ms", "load_ms", "fork_ms", "fork8_ms"):
        assert 0 < result[key]["p50"] <= result[key]["p95"], (key, result[key])
    assert result["restore_ms"]["p50"] > result["pool_take_ms"]["p50"]  # a take is not passed off as a restore
    assert result["pool_take_to_first_cell_ms"]["p50"] > result["pool_take_ms"]["p50"]
    assert result["pss_mib_per_session"] > 0 and result["idle_cpu_pct_per_session"] >= 0
    assert result["max_idle_sessions"] > 0 and result["max_idle_sessions_basis"] in ("measured", "extrapolated from 3")
