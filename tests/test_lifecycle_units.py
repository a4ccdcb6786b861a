"""The lifecycle surface without VMs: `vmcell serve`'s flags, the bench's /proc readings, and the
REST handlers and SDK methods for pause, resume, fork and timeouts over HTTP, against a stand-in
for the session manager (the real one is exercised in test_lifecycle_api.py)."""

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httpserver import HTTPServer

from interpreter.bench_api import free_port
from interpreter.bench_lifecycle import (cpu_percent, cpu_seconds, idle_capacity, mem_available_kib,
                                         parse_stat_cpu_ticks, pss_kib)
from interpreter.cli import build_parser, lifecycle_settings, main
from interpreter.client import AsyncSandbox, NotFoundError, Sandbox, SandboxInfo, SessionClosedError
from interpreter.config import DEFAULT_AUTO_PAUSE_S, MAX_FORK_COUNT, state_dir
from interpreter.errors import InvalidRequest, SessionClosed, SessionNotFound
from interpreter.server import make_app

TOKEN = "unit-token"


# ---- vmcell serve's lifecycle flags ---------------------------------------------------------------


def serve_settings(*flags):
    return lifecycle_settings(build_parser().parse_args(["serve", *flags]))


def test_serve_lifecycle_defaults_and_flags(tmp_path):
    default = serve_settings()
    assert default.pool == {} and default.auto_pause_s == DEFAULT_AUTO_PAUSE_S
    assert default.save_after_s is None and default.state_dir == state_dir()
    custom = serve_settings("--pool", "3", "--pool", "other=2", "--pool", "third=0", "--auto-pause", "0",
                            "--save-after", "300", "--state-dir", str(tmp_path))
    assert custom.pool == {"python": 3, "other": 2}  # 0: no pool for that template
    assert custom.auto_pause_s is None and custom.save_after_s == 300 and custom.state_dir == tmp_path
    assert serve_settings("--ephemeral", "--auto-pause", "2.5").state_dir is None
    assert serve_settings("--ephemeral", "--auto-pause", "2.5").auto_pause_s == 2.5


@pytest.mark.parametrize("flags, says", [
    (["--pool", "python=x"], "argument --pool: 'python=x': 'x' is not a whole number"),
    (["--pool", "x"], "argument --pool"),
    (["--pool", "=3"], "argument --pool: '=3': the template name"),
    (["--pool", "-1"], "argument --pool"),
    (["--pool", "python=-2"], "argument --pool: 'python=-2': the pool size must be 0 or more"),
    (["--pool", "2", "--pool", "python=1"], "argument --pool: template 'python' is given twice"),
    (["--auto-pause", "soon"], "argument --auto-pause: 'soon' is not a number of seconds"),
    (["--save-after", "-5"], "argument --save-after"),
    (["--save-after", "inf"], "argument --save-after: 'inf': want 0 or more seconds"),
    (["--ephemeral", "--state-dir", "/tmp/x"], "not allowed with argument"),
])
def test_serve_rejects_bad_lifecycle_flags_naming_the_flag(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", *flags])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_serve_rejects_a_pool_of_a_template_that_does_not_exist(capsys):
    assert main(["serve", "--no-build", "--pool", "no-such-template=1"]) == 2
    assert "--pool names no template 'no-such-template'" in capsys.readouterr().err


# ---- what the lifecycle bench reads from /proc -----------------------------------------------------


def test_stat_parsing_survives_odd_command_names():
    fields = ["S"] + [str(n) for n in range(4, 53)]  # fields 3.. ; utime is field 14, stime 15
    assert parse_stat_cpu_ticks(f"1234 (a) b (c)) {' '.join(fields)}") == 14 + 15


async def test_cpu_seconds_and_cpu_percent_of_this_process():
    pid = os.getpid()
    before = cpu_seconds(pid)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert 0.2 < cpu_seconds(pid) - before < 5
    busy = asyncio.get_running_loop().run_in_executor(None, lambda: [sum(range(10_000)) for _ in range(2_000)])
    (percent,) = await cpu_percent([pid], 0.3)
    await busy
    assert 10 < percent < 100 * (os.cpu_count() or 1) + 20


def test_pss_and_available_memory():
    rss_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    assert 1000 < pss_kib(os.getpid()) <= rss_kib + 1024
    assert 0 < mem_available_kib() < 1 << 40


def test_idle_capacity_takes_the_lower_bound_and_says_whether_it_was_measured():
    memory_bound = idle_capacity(sessions=50, pss_mib=100, cpu_pct=0.1, mem_available_mib=20_000, cores=2)
    assert memory_bound["max_idle_sessions"] == 200 and memory_bound["max_idle_sessions_limited_by"] == "memory"
    assert memory_bound["max_idle_sessions_by_cpu"] == 2000
    assert memory_bound["max_idle_sessions_basis"] == "extrapolated from 50"
    cpu_bound = idle_capacity(sessions=50, pss_mib=10, cpu_pct=5, mem_available_mib=20_000, cores=2)
    assert cpu_bound["max_idle_sessions"] == 40 and cpu_bound["max_idle_sessions_basis"] == "measured"
    no_cpu = idle_capacity(sessions=5, pss_mib=100, cpu_pct=0.0, mem_available_mib=1000, cores=2)
    assert no_cpu["max_idle_sessions"] == 10 and no_cpu["max_idle_sessions_by_cpu"] is None
    json.dumps(no_cpu)  # no inf or nan in the bench's JSON


# A `vmcell bench lifecycle --sessions 3 --runs 2 --json` run here (TCG), restore_ms made up.
BENCH_RESULT = {
    "accel": "tcg",
    "template": "python",
    "sessions": 3,
    "runs": 2,
    "cores": 2,
    "pool_size": 2,
    "pool_take_ms": {"p50": 25.9, "p95": 27.4},
    "pool_take_misses": 0,
    "pool_first_cell_ms": {"p50": 81.0, "p95": 95.2},
    "pool_take_to_first_cell_ms": {"p50": 108.4, "p95": 121.0},
    "restore_ms": {"p50": 301.2, "p95": 340.0},
    "pause_ms": {"p50": 0.9, "p95": 1.6},
    "resume_ms": {"p50": 4.5, "p95": 6.4},
    "save_ms": {"p50": 792.7, "p95": 1035.4},
    "load_ms": {"p50": 156.8, "p95": 159.9},
    "fork_ms": {"p50": 937.8, "p95": 1133.0},
    "fork8_ms": {"p50": 1727.8, "p95": 1785.4},
    "idle_window_s": 2.0,
    "running_idle_cpu_pct_per_session": 0.666,
    "idle_cpu_pct_per_session": 0.0,
    "pss_mib_per_session": 397.7,
    "mem_available_mib": 22192,
    "max_idle_sessions": 55,
    "max_idle_sessions_basis": "extrapolated from 3",
    "max_idle_sessions_limited_by": "memory",
    "max_idle_sessions_by_memory": 55,
    "max_idle_sessions_by_cpu": None,
}


def test_bench_lifecycle_prints_every_figure(monkeypatch, capsys):
    import interpreter.bench_lifecycle

    async def fake_bench(sessions, template, runs, idle_window, progress=None):
        assert (sessions, template, runs, idle_window) == (3, "python", 2, 1.5)
        return BENCH_RESULT

    monkeypatch.setattr(interpreter.bench_lifecycle, "bench_lifecycle", fake_bench)
    assert main(["bench", "lifecycle", "--sessions", "3", "--runs", "2", "--idle-window", "1.5"]) == 0
    out = capsys.readouterr().out
    for label in ("pool take", "its first cell", "take -> first cell answered", "restore from the template", "pause in memory", "resume from memory", "save to disk",
                  "load from disk", "fork, 1 child", "fork, 8 children"):
        assert label in out, label
    assert "accelerator TCG" in out and "p50    301.2 ms" in out
    assert "idle sessions this host holds: 55 (extrapolated from 3; limited by memory" in out
    assert main(["bench", "lifecycle", "--sessions", "0"]) == 2


# ---- REST and SDK, against a stand-in for the manager ----------------------------------------------


def fake_session(session_id: str, state: str = "running"):
    session = SimpleNamespace(id=session_id, state=SimpleNamespace(value=state), expires_at=None)
    session.info = lambda: {"id": session.id, "template": "python", "hostname": f"vmcell-{session_id[:8]}",
                            "created_at": 1_700_000_000.0, "expires_at": session.expires_at,
                            "state": session.state.value, "cause": None, "paused_at": None, "durable": False}
    return session


class FakeManager:
    """The manager API the lifecycle handlers use, with sessions that are only records."""

    max_sessions = 8

    def __init__(self):
        self.sessions = {"s1": fake_session("s1")}
        self.closed = {"gone": "session gone was closed (closed by a client)"}
        self.calls = []

    def list(self):
        return list(self.sessions.values())

    def get(self, session_id):
        if session_id in self.closed:
            raise SessionClosed(self.closed[session_id])
        if session_id not in self.sessions:
            raise SessionNotFound(f"no session with id {session_id!r}")
        return self.sessions[session_id]

    async def pause(self, session_id):
        self.calls.append(("pause", session_id))
        self.get(session_id).state.value = "saved"
        return self.get(session_id)

    async def resume(self, session_id):
        self.calls.append(("resume", session_id))
        self.get(session_id).state.value = "running"
        return self.get(session_id)

    async def fork(self, session_id, count=1):
        self.calls.append(("fork", session_id, count))
        self.get(session_id)
        if count > MAX_FORK_COUNT:
            raise InvalidRequest(f"at most {MAX_FORK_COUNT} children per fork")
        children = [fake_session(f"{session_id}-child{i}") for i in range(count)]
        self.sessions.update({child.id: child for child in children})
        return children

    def set_timeout(self, session_id, seconds):
        self.calls.append(("timeout", session_id, seconds))
        session = self.get(session_id)
        session.expires_at = 1_700_000_100.0 + seconds
        return session

    async def close(self, session_id, reason="closed by a client"):
        self.get(session_id)
        self.closed[session_id] = f"session {session_id} was closed ({reason})"
        del self.sessions[session_id]


@pytest.fixture
async def fake_api():
    manager = FakeManager()
    port = free_port()
    server = HTTPServer(make_app(manager, TOKEN))
    server.listen(port, "127.0.0.1")
    client = AsyncHTTPClient(force_instance=True)

    async def call(method, path, body=None, token=TOKEN):
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        headers = {"Authorization": f"token {token}"} if token else {}
        try:
            return await client.fetch(HTTPRequest(f"http://127.0.0.1:{port}{path}", method, headers=headers, body=data))
        except HTTPClientError as exc:
            return exc.response

    call.manager, call.url = manager, f"http://127.0.0.1:{port}"
    yield call
    client.close()
    server.stop()


async def test_lifecycle_endpoints_answer_with_session_info(fake_api):
    paused = await fake_api("POST", "/sessions/s1/pause")
    assert paused.code == 200 and json.loads(paused.body)["state"] == "saved"
    resumed = await fake_api("POST", "/sessions/s1/resume")
    assert resumed.code == 200 and json.loads(resumed.body)["state"] == "running"
    forked = await fake_api("POST", "/sessions/s1/fork", {"count": 2})
    assert forked.code == 201
    assert [s["id"] for s in json.loads(forked.body)["sessions"]] == ["s1-child0", "s1-child1"]
    assert (await fake_api("POST", "/sessions/s1/fork")).code == 201  # count defaults to 1
    assert (await fake_api("POST", "/sessions/s1/fork", {"count": None})).code == 201
    timed = await fake_api("POST", "/sessions/s1/timeout", {"timeout": 30})
    assert timed.code == 200 and json.loads(timed.body)["expires_at"] == 1_700_000_130.0
    with_timeout = await fake_api("POST", "/sessions/s1/fork", {"count": 1, "timeout": 5})
    assert json.loads(with_timeout.body)["sessions"][0]["expires_at"] == 1_700_000_105.0
    assert fake_api.manager.calls == [("pause", "s1"), ("resume", "s1"), ("fork", "s1", 2), ("fork", "s1", 1),
                                      ("fork", "s1", 1), ("timeout", "s1", 30), ("fork", "s1", 1), ("timeout", "s1-child0", 5)]


async def test_lifecycle_endpoints_refuse_bad_input_clearly(fake_api):
    for path in ("pause", "resume", "fork", "timeout"):
        assert (await fake_api("POST", f"/sessions/s1/{path}", {"timeout": 1}, token=None)).code == 401
        missing = await fake_api("POST", f"/sessions/nope/{path}", {"timeout": 1})
        assert missing.code == 404 and "nope" in json.loads(missing.body)["message"], path
        gone = await fake_api("POST", f"/sessions/gone/{path}", {"timeout": 1})
        assert gone.code == 410 and json.loads(gone.body)["error"] == "SessionClosed", path
    fake_api.manager.calls.clear()
    for count, says in ((0, "at least 1"), (-3, "at least 1"), ("x", "integer"), (True, "integer"), (1.5, "integer"),
                        ([2], "integer"), (MAX_FORK_COUNT + 1, f"at most {MAX_FORK_COUNT}")):
        bad = await fake_api("POST", "/sessions/s1/fork", {"count": count})
        assert bad.code == 400 and says in json.loads(bad.body)["message"], (count, bad.body)
    assert (await fake_api("POST", "/sessions/s1/fork", {"count": 1, "timeout": 0})).code == 400
    for body in ({}, {"timeout": 0}, {"timeout": -1}, {"timeout": "soon"}, {"timeout": False}):
        bad = await fake_api("POST", "/sessions/s1/timeout", body)
        assert bad.code == 400 and "timeout" in json.loads(bad.body)["message"], body
    assert [call[0] for call in fake_api.manager.calls] == ["fork"]  # only the count past the limit got through


def test_sandbox_info_from_the_servers_session_json():
    info = SandboxInfo.from_dict({"id": "abc", "template": "python", "state": "saved", "created_at": 0.0,
                                  "expires_at": 60.0, "hostname": "vmcell-abc", "cause": None, "accel": "tcg",
                                  "last_activity": 1.5, "restore_ms": 290.1, "idle_timeout": None,
                                  "paused_at": 2.0, "durable": True})
    assert (info.sandbox_id, info.template_id, info.state, info.hostname) == ("abc", "python", "saved", "vmcell-abc")
    assert info.started_at.timestamp() == 0 and info.end_at.timestamp() == 60 and info.started_at.tzinfo
    assert info.paused_at.timestamp() == 2.0 and info.durable
    assert SandboxInfo.from_dict({"id": "x", "created_at": 5.0}).end_at is None
    with pytest.raises(AttributeError):
        info.state = "running"  # frozen


async def test_sync_sdk_lifecycle_calls(fake_api):
    manager = fake_api.manager

    def scenario():
        opts = {"base_url": fake_api.url, "token": TOKEN}
        manager.sessions["s1"].state.value = "saved"
        sandbox = Sandbox.connect("s1", **opts)  # saved: connect resumes it
        assert sandbox.sandbox_id == "s1" and manager.calls == [("resume", "s1")]
        assert Sandbox.connect("s1", timeout=12, **opts).info["expires_at"] == 1_700_000_112.0
        assert manager.calls[1:] == [("timeout", "s1", 12)]  # a running one is not resumed again
        assert sandbox.pause() == "s1" and sandbox.get_info().state == "saved"
        sandbox.set_timeout(7)
        assert sandbox.get_info().end_at.timestamp() == 1_700_000_107.0
        children = sandbox.fork(count=2)
        assert [c.sandbox_id for c in children] == ["s1-child0", "s1-child1"] and children[0].files
        listed = Sandbox.list(**opts)
        assert {i.sandbox_id for i in listed} == {"s1", "s1-child0", "s1-child1"}
        assert all(isinstance(i, SandboxInfo) for i in listed)
        with pytest.raises(NotFoundError):
            Sandbox.connect("nope", **opts)
        with pytest.raises(SessionClosedError, match="was closed"):
            Sandbox.connect("gone", **opts)
        with pytest.raises(NotFoundError):
            Sandbox.connect("../sessions", **opts)  # one path segment, whatever the id holds

    await asyncio.to_thread(scenario)


async def test_async_sdk_lifecycle_calls(fake_api):
    opts = {"base_url": fake_api.url, "token": TOKEN}
    fake_api.manager.sessions["s1"].state.value = "paused"
    sandbox = await AsyncSandbox.connect("s1", **opts)
    assert fake_api.manager.calls == [("resume", "s1")]
    assert await sandbox.pause() == "s1" and (await sandbox.get_info()).state == "saved"
    await sandbox.set_timeout(3)
    assert (await sandbox.get_info()).end_at.timestamp() == 1_700_000_103.0
    (child,) = await sandbox.fork()
    assert isinstance(child, AsyncSandbox) and child.sandbox_id == "s1-child0"
    assert {i.sandbox_id for i in await AsyncSandbox.list(**opts)} == {"s1", "s1-child0"}
    with pytest.raises(SessionClosedError):
        await AsyncSandbox.connect("gone", **opts)
