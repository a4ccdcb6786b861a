"""The host's CommandRunner against a fake guest: events routed by id, hostile events dropped, the
output cap, a link that closes mid-command, and leaving early kills. Pure logic: no VM."""

import asyncio

import pytest

from interpreter.config import OUTPUT_CAP_BYTES
from interpreter.errors import LinkClosed
from interpreter.kernel.commands import CommandExit, CommandOutput, CommandRunner, CommandStarted
from interpreter.kernel.link import ControlEvent


class FakeLink:
    def __init__(self):
        self.closed = False
        self.callbacks = []

    def add_close_callback(self, callback):
        self.callbacks.append(callback)


class FakeAgent:
    """Starts nothing: the test plays the guest by sending events."""

    def __init__(self):
        self.link = FakeLink()
        self.handlers = []
        self.started = asyncio.Queue()
        self.killed = []

    def on_event(self, handler):
        self.handlers.append(handler)

    def send(self, event_name, **fields):
        for handler in self.handlers:
            handler(ControlEvent(event_name, {"event": event_name, **fields}))

    async def command_start(self, command_id, cmd, envs, cwd, timeout):
        await self.started.put(command_id)
        return 4242

    async def command_kill(self, command_id):
        self.killed.append(command_id)
        return True


async def collect(runner, agent, script):
    """Runs a command while `script(command_id)` plays the guest; returns its events."""
    events = []

    async def consume():
        async for event in runner.run("true"):
            events.append(event)

    task = asyncio.ensure_future(consume())
    command_id = await agent.started.get()
    await script(command_id)
    await asyncio.wait_for(task, 5)
    return events


async def test_events_are_routed_checked_and_capped():
    agent = FakeAgent()
    runner = CommandRunner(agent)

    async def guest(cid):
        agent.send("command_output", id="someone-else", stream="stdout", data="not ours")
        agent.send("command_output", id=cid, stream="stdout", data="hello ")
        agent.send("command_output", id=cid, stream="stdin", data="bad stream")
        agent.send("command_output", id=cid, stream="stdout", data=5)  # not text
        agent.send("command_output", id=cid, stream="stdout", data="x" * (300 * 1024))  # past one event's size
        for _ in range(OUTPUT_CAP_BYTES // 65536 - 1):
            agent.send("command_output", id=cid, stream="stderr", data="e" * 65536)
        agent.send("command_output", id=cid, stream="stderr", data="e" * 65535)
        agent.send("command_output", id=cid, stream="stderr", data="past the cap")  # one character fits
        agent.send("kernel_died", returncode=1)  # not a command event: ignored here
        agent.send("command_exit", id=cid, exit_code=10**9, error=["no"], timed_out="yes", truncated=["stdout", "x"])

    events = await collect(runner, agent, guest)
    assert events[0] == CommandStarted(events[0].id, 4242)
    assert events[1] == CommandOutput("stdout", "hello ")
    assert [e.stream for e in events[1:-1]] == ["stdout"] + ["stderr"] * (OUTPUT_CAP_BYTES // 65536 + 1)
    assert events[-2] == CommandOutput("stderr", "p")
    assert sum(len(e.data) for e in events if isinstance(e, CommandOutput) and e.stream == "stderr") == OUTPUT_CAP_BYTES
    end = events[-1]
    assert end == CommandExit(-1, "the guest sent an ill-shaped exit", False, ("stderr", "stdout"))
    assert agent.killed == []  # it ended by itself


async def test_a_link_that_closes_ends_the_stream_and_leaving_early_kills():
    agent = FakeAgent()
    runner = CommandRunner(agent)
    failure = LinkClosed("the VM died")

    async def guest(cid):
        agent.send("command_output", id=cid, stream="stdout", data="partial")
        agent.link.closed = True
        for callback in agent.link.callbacks:
            callback(failure)

    with pytest.raises(LinkClosed):
        await collect(runner, agent, guest)
    assert agent.killed == []  # nobody to tell: the link is gone

    agent.link.closed = False
    events = runner.run("sleep 100")
    assert isinstance(await events.__anext__(), CommandStarted)
    command_id = await agent.started.get()
    await events.aclose()  # the client left
    assert agent.killed == [command_id]
    agent.send("command_exit", id=command_id, exit_code=0)  # late: routed nowhere, no error


async def test_watch_events_are_routed_and_checked():
    from interpreter.kernel.watch import FilesEvent, WatchRunner, WatchStarted

    agent = FakeAgent()
    calls = []

    async def call(op, args, timeout=30.0):
        calls.append((op.value, args))
        return {"id": args["id"], "path": "/root/d"}

    agent.call = call
    runner = WatchRunner(agent)
    events = runner.watch("d", recursive=True)
    assert await events.__anext__() == WatchStarted("/root/d")
    watch_id = calls[0][1]["id"]
    agent.send("files_event", id="other", name="x", type="create")
    agent.send("files_event", id=watch_id, name="x" * 5000, type="create")
    agent.send("files_event", id=watch_id, name="a", type="explode")
    agent.send("files_event", id=watch_id, name=["a"], type="write")
    agent.send("files_event", id=watch_id, name="a.txt", type="write")
    assert await events.__anext__() == FilesEvent("a.txt", "write")
    await events.aclose()
    assert calls[-1] == ("files_unwatch", {"id": watch_id})
