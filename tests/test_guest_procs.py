"""The guest's process control: the kernel's cgroup, kill_children, restarts from the fork server.

Ops are driven directly (session.link.request) and cells through session.execute, so these tests
do not depend on how the host's kernel client escalates."""

import asyncio
import base64
import io
import time

import pytest
from PIL import Image

from interpreter.errors import GuestOperationError
from vmcell_guest.ops import ErrorKind, Event, Op
from vmcell_guest.wire import PROTOCOL_VERSION

pytestmark = pytest.mark.vm


@pytest.fixture
async def session(manager):
    return await manager.create()


async def status(session) -> dict:
    return await session.link.request(Op.kernel_status)


async def cgroup_pids(session) -> list[int]:
    ran = await session.run(["cat", "/sys/fs/cgroup/kernel/cgroup.procs"])
    return sorted(int(p) for p in ran.stdout.split())


class Pinger:
    """Pings the agent every half second while a test does something nasty to the kernel."""

    def __init__(self, session):
        self.session, self.times, self.failures = session, [], []

    async def _run(self):
        while True:
            start = time.monotonic()
            try:
                await self.session.link.request(Op.ping, timeout=5)
                self.times.append(time.monotonic() - start)
            except Exception as exc:
                self.failures.append(exc)
            await asyncio.sleep(0.5)

    async def __aenter__(self):
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()


def test_every_op_has_a_handler():
    from types import SimpleNamespace

    from vmcell_guest.agent import OPS, kernel_ops, surface_ops

    handlers = SimpleNamespace(start=None, kill=None, stop=None)
    assert set(OPS) | set(kernel_ops(None)) | set(surface_ops(handlers, handlers)) == set(Op)
    assert {e.value for e in Event} == {"kernel_died", "dropped", "memory_limit", "command_output", "command_exit",
                                        "files_event"}


def test_exceptions_map_to_error_kinds():
    from vmcell_guest.agent import Agent
    from vmcell_guest.ops import OpError
    from vmcell_guest.wire import FrameDecoder, decode_control

    sent = []
    agent = object.__new__(Agent)  # no port, no kernel: only the error mapping
    agent.port = type("Port", (), {"write": staticmethod(sent.append)})()
    cases = [
        (FileNotFoundError(2, "No such file or directory", "/a"), ErrorKind.NotFound),
        (IsADirectoryError(21, "Is a directory", "/a"), ErrorKind.IsADirectory),
        (NotADirectoryError(20, "Not a directory", "/a"), ErrorKind.NotADirectory),
        (PermissionError(13, "Permission denied", "/a"), ErrorKind.PermissionDenied),
        (OSError(5, "Input/output error"), ErrorKind.Internal),
        (KeyError("boom"), ErrorKind.Internal),
        (OpError(ErrorKind.NoKernel, "no kernel"), ErrorKind.NoKernel),
    ]
    for exc, _ in cases:
        def fail(args, exc=exc):
            raise exc
        agent._call(7, fail, {})
    agent._call(8, lambda args: {}, ["not", "an", "object"])
    replies = [decode_control(frame.body) for frame in FrameDecoder().feed(b"".join(sent))]
    assert [r["error"]["type"] for r in replies] == [kind for _, kind in cases] + [ErrorKind.BadRequest]
    assert "boom" in replies[5]["error"]["message"] and "/a" in replies[0]["error"]["message"]


async def test_errors_have_kinds(session):
    async def kind(op, args):
        with pytest.raises(GuestOperationError) as info:
            await session.link.request(op, args)
        return info.value.kind

    assert await kind(Op.files_read, {"path": "no/such/file"}) == ErrorKind.NotFound
    assert await kind(Op.files_read, {"path": "/root"}) == ErrorKind.IsADirectory
    await session.write_file("plain.txt", b"x")
    assert await kind(Op.files_list, {"path": "plain.txt"}) == ErrorKind.NotADirectory
    assert await kind(Op.files_write, {"path": "x", "data": "not base64!"}) == ErrorKind.BadRequest
    assert await kind("no_such_op", {}) == ErrorKind.UnknownOp
    assert await kind(Op.kernel_kill_children, {"all": "yes"}) == ErrorKind.BadRequest
    assert await kind(Op.kernel_start, {"key": "k", "limits": {"pids_max": 1}}) == ErrorKind.BadRequest
    assert await kind(Op.run, {"argv": ["/no/such/program"]}) == ErrorKind.SpawnFailed


async def test_kernel_lives_in_its_cgroup(session):
    st = await status(session)
    assert st["alive"] and st["mode"] == "fork" and st["forkserver"]["alive"]
    assert {"pids", "memory"} <= set(st["controllers"])
    assert await cgroup_pids(session) == [st["pid"]]  # not the agent, not init, not the fork server
    assert st["pids_max"] >= 64 and st["memory_max"] > 256 * 2**20 and st["oom_kills"] == 0
    assert st["forkserver"]["pid"] not in await cgroup_pids(session)


async def test_fork_bomb_is_contained(session):
    async with Pinger(session) as pinger:
        # The host's cell engine stops it (SIGINT, kernel_kill_children, a restart if need be: see
        # test_cell_engine.py); here, what the guest guarantees: the agent answers throughout, and
        # afterwards the cgroup holds the kernel alone.
        bomb = await session.execute("import os\nwhile True:\n    os.fork()", timeout=20)
        assert bomb.error is not None and bomb.error.name in ("BlockingIOError", "CellTimeout", "KernelDied"), bomb.error
        start = time.monotonic()
        two = await session.execute("1 + 1", timeout=30)
        assert two.text == "2" and time.monotonic() - start < 10
        st = await status(session)
        assert st["alive"] and await cgroup_pids(session) == [st["pid"]]
        # The kernel can spawn again: no zombies left counting against pids.max.
        assert (await session.execute("import subprocess; subprocess.run(['true']).returncode")).text == "0"
    assert not pinger.failures and len(pinger.times) >= 10 and max(pinger.times) < 2.0, pinger.times


async def test_kill_children_spares_earlier_cells_and_the_kernel(session):
    await session.execute("import subprocess\nold = subprocess.Popen('sleep 1000', shell=True)")
    kernel_pid = (await status(session))["pid"]
    earlier = set(await cgroup_pids(session)) - {kernel_pid}
    assert earlier
    # (No timeout: past one, the host's engine would kill them itself; here the op is called directly.)
    spawned = asyncio.Event()
    slow = asyncio.ensure_future(session.execute(
        "kids = []\nfor _ in range(50):\n    kids.append(subprocess.Popen('sleep 1000', shell=True))\n"
        "print('spawned', flush=True)\nimport time\ntime.sleep(600)",
        on_event=lambda event: event.type == "stdout" and spawned.set()))
    await asyncio.wait_for(spawned.wait(), 60)
    assert len(await cgroup_pids(session)) >= 1 + len(earlier) + 50
    killed = await session.link.request(Op.kernel_kill_children, {}, timeout=60)
    assert killed["killed"] >= 50 and killed["gone"] and not killed["pids_max_hit"], killed
    assert set(await cgroup_pids(session)) == {kernel_pid} | earlier
    await session.interrupt()
    assert (await asyncio.wait_for(slow, 30)).error.name == "KeyboardInterrupt"
    # The kernel's Popen objects see what happened to their children.
    codes = await session.execute("sorted({k.poll() for k in kids}), old.poll()")
    assert codes.text == "([-9], None)"
    everything = await session.link.request(Op.kernel_kill_children, {"all": True}, timeout=60)
    assert everything["killed"] == len(earlier)
    assert await cgroup_pids(session) == [kernel_pid]
    assert (await session.execute("old.wait()")).text == "-9"


async def test_restart_leaves_only_the_new_kernel_forked_warm(session):
    await session.execute("import subprocess\np = subprocess.Popen(['sleep', '1000'])\nimport numpy")
    before = await status(session)
    assert len(await cgroup_pids(session)) == 2
    draws = set()
    for _ in range(2):
        await session.restart()
        st = await status(session)
        assert st["alive"] and st["pid"] != before["pid"] and st["mode"] == "fork"
        assert await cgroup_pids(session) == [st["pid"]]
        # Forked with numpy (and matplotlib, pandas) already imported, and reseeded.
        warm = await session.execute("import sys; 'numpy' in sys.modules and 'matplotlib.pyplot' in sys.modules")
        assert warm.text == "True"
        draws.add((await session.execute("import numpy; float(numpy.random.rand())")).text)
    assert len(draws) == 2
    # The inline backend is wired into the forked kernel: a figure shows without plt.show().
    plot = await session.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nNone")
    (png,) = [r for r in plot.results if r.png]
    assert Image.open(io.BytesIO(base64.b64decode(png.png))).format == "PNG"


async def test_memory_hog_meets_the_kernel_limit_not_the_guest(session):
    events = []
    forward = session.link.on_event

    def spy(event):
        events.append(event)
        forward(event)

    session.link.on_event = spy
    limit = (await status(session))["memory_max"]
    async with Pinger(session) as pinger:
        # One C call past the limit (a Python loop is interrupted at the high-water mark before it
        # gets there: tests/test_memory_limit.py), below the guest's RAM.
        hog = await session.execute(f"import numpy\nhog = numpy.ones({(limit + 128 * 2**20) // 8})", timeout=300)
        assert hog.error.name == "MemoryLimitExceeded" and hog.error.fault, hog.error
    died = [e for e in events if e.name == Event.kernel_died]
    assert len(died) == 1 and died[0].fields["returncode"] == -9 and died[0].fields["oom_killed"] is True
    st = await status(session)
    assert not st["alive"] and st["oom_kills"] >= 1 and st["returncode"] == -9
    assert not pinger.failures and await session.ping() > 0
    await session.restart()
    assert (await session.execute("1 + 1")).text == "2"


async def test_agent_death_takes_the_kernel_tree_and_a_new_agent_recovers(session):
    await session.execute("import subprocess; p = subprocess.Popen(['sleep', '1000'])")
    old = await status(session)
    hello = {"version": PROTOCOL_VERSION, "sync": session.link.sync_nonce}  # this connection's nonce
    agent = (await session.link.request(Op.hello, hello))["pid"]
    with pytest.raises(Exception):  # the agent dies before it can answer
        await session.link.request(Op.run, {"argv": ["kill", "-9", str(agent)]}, timeout=3)
    deadline = time.monotonic() + 30
    while True:  # init restarts the agent; the link carries on
        try:
            if (await session.link.request(Op.hello, hello, timeout=1))["pid"] != agent:
                break
        except Exception:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
    st = await status(session)
    assert not st["alive"] and st["forkserver"] is None and await cgroup_pids(session) == []
    ps = (await session.run(["ps", "-eo", "pid="])).stdout.split()
    assert str(old["pid"]).encode() not in ps and str(old["forkserver"]["pid"]).encode() not in ps
    await session.restart()  # a new fork server, given the template's preload list again by the host
    st = await status(session)
    assert st["alive"] and "matplotlib.pyplot" in st["forkserver"]["imported"]
    assert (await session.execute("import sys; 'pandas' in sys.modules")).text == "True"
