"""The kernel's memory limit made visible (real VMs, TCG): a cell that grows past the high-water mark
is interrupted before the OOM killer fires and ends with MemoryLimitExceeded, the kernel keeping its
variables; an allocation the interrupt cannot stop (C code, a child process) meets the OOM killer and
ends with MemoryLimitExceeded too (a KernelDied fault with a restart when the kernel itself was
killed); a 2 GiB allocation in a 1 GiB guest is refused. Through the session API, REST (JSON and
NDJSON), the Jupyter websocket, and the SDK's error mapping."""

import asyncio
import json
import time

import pytest

from interpreter.client import KernelDiedError, MemoryLimitExceededError, _Assembler
from interpreter.errors import KernelDied, MemoryLimitExceeded
from interpreter.kernel.agent import MemoryEvent
from interpreter.kernel.engine import memory_error
from interpreter.kernel.results import ExecutionError
from tests.conftest import body
from tests.test_gateway import collect, connect, execute_request
from vmcell_guest.ops import Event, Op

MiB = 2**20
# Grows by 32 MiB a step inside a function: what it holds lives in the interrupted frame only.
GROW = """
def grow():
    chunks = []
    while True:
        chunks.append(bytearray(32 * 2**20))
grow()
"""


def oom_code(memory_max: int) -> str:
    """One C call (numpy fills the array in a loop that no SIGINT interrupts) past the kernel's limit
    and below the guest's RAM, so the kernel's overcommit check lets it through to the OOM killer."""
    return f"import numpy\na = numpy.ones({(memory_max + 128 * MiB) // 8})"


async def status(session) -> dict:
    return await session.link.request(Op.kernel_status)


async def peak(session) -> int:
    return int((await session.run(["cat", "/sys/fs/cgroup/kernel/memory.peak"])).stdout)


def spy_events(session) -> list:
    events = []
    forward = session.link.on_event

    def spy(event):
        events.append(event)
        forward(event)

    session.link.on_event = spy
    return events


@pytest.fixture
async def session(manager):
    return await manager.create()


# ---- no VM: the host's reading of the guest's reports ------------------------------------------------


def test_memory_events_from_the_guest_are_checked():
    good = {"action": "interrupt", "msg_id": "m", "memory_current": 500 * MiB, "memory_max": 520 * MiB,
            "memory_high": 450 * MiB}
    assert MemoryEvent.parse(good) == MemoryEvent("interrupt", "m", 500 * MiB, 520 * MiB, 450 * MiB)
    assert MemoryEvent.parse({**good, "action": "explode"}) is None
    assert MemoryEvent.parse({**good, "msg_id": 7}) is None
    assert MemoryEvent.parse({**good, "msg_id": "x" * 1000}) is None
    odd = MemoryEvent.parse({**good, "memory_current": -1, "memory_max": True, "memory_high": 2**60})
    assert (odd.memory_current, odd.memory_max, odd.memory_high) == (None, None, None)


def test_the_interrupt_becomes_memory_limit_exceeded_and_other_errors_stay():
    event = MemoryEvent("interrupt", "m", 500 * MiB, 520 * MiB, 450 * MiB)
    interrupted = memory_error(event, ExecutionError("KeyboardInterrupt", "", ["frame"]))
    assert interrupted.name == "MemoryLimitExceeded" and interrupted.traceback == ["frame"]
    assert "500 MiB of its 520 MiB" in interrupted.value and "variables are kept" in interrupted.value
    # The user's code made something else of the KeyboardInterrupt: that stays the error.
    other = ExecutionError("ValueError", "no", [])
    assert memory_error(event, other) is other
    killed = memory_error(MemoryEvent("oom_kill", "m", None, 520 * MiB, None), other)
    assert killed.name == "MemoryLimitExceeded" and "OOM killer" in killed.value and "ValueError: no" in killed.value
    assert memory_error(MemoryEvent("oom_kill", "m", None, None, None), None).name == "MemoryLimitExceeded"


def test_the_sdk_raises_memory_limit_exceeded_for_the_fault_line_and_returns_the_interrupt():
    assert issubclass(MemoryLimitExceeded, KernelDied) and MemoryLimitExceeded.http_status == 409
    fault = _Assembler(None, None, None, None)
    fault.feed({"type": "error", "name": "MemoryLimitExceeded", "value": "killed", "traceback": [], "fault": True})
    with pytest.raises(MemoryLimitExceededError) as caught:
        fault.outcome()
    assert isinstance(caught.value, KernelDiedError) and caught.value.status == 409
    interrupted = _Assembler(None, None, None, None)
    interrupted.feed({"type": "error", "name": "MemoryLimitExceeded", "value": "interrupted", "traceback": []})
    interrupted.feed({"type": "end", "execution_count": 3})
    assert interrupted.outcome().error.name == "MemoryLimitExceeded"


# ---- real VMs ------------------------------------------------------------------------------------------


@pytest.mark.vm
async def test_growth_is_interrupted_at_the_high_water_mark_and_the_kernel_keeps_its_variables(session):
    st = await status(session)
    limit, mark = st["memory_max"], st["memory_high"]
    assert limit and mark and limit - 128 * MiB <= mark <= limit - 32 * MiB, st
    events = spy_events(session)
    await session.execute("kept = 41")
    start = time.monotonic()
    grown = await session.execute(GROW, timeout=300)
    took = time.monotonic() - start
    assert grown.error is not None and grown.error.name == "MemoryLimitExceeded", grown.error
    assert not grown.error.fault and "the cell was interrupted" in grown.error.value
    assert "MiB of its" in grown.error.value and any("bytearray" in line for line in grown.error.traceback)
    (event,) = [e for e in events if e.name == Event.memory_limit]
    assert event.fields["action"] == "interrupt" and event.fields["memory_current"] >= mark
    # Stopped before the limit: no OOM kill, no restart, and never more than a chunk past the mark.
    high = await peak(session)
    print(f"\nmark {mark / MiB:.0f} MiB, limit {limit / MiB:.0f} MiB, peak {high / MiB:.0f} MiB; "
          f"cell {took:.1f} s")
    assert mark <= high < limit
    after = await status(session)
    assert after["oom_kills"] == 0 and after["alive"] and after["pid"] == st["pid"]
    assert session.kernel.lifecycle.restarts == 0
    # What the interrupted frame held is freed; the kernel keeps its other variables; no restart needed.
    assert after["memory_current"] < mark - 200 * MiB, after
    assert (await session.execute("kept + 1")).text == "42"
    assert (await session.execute("x = bytearray(200 * 2**20); len(x) // 2**20")).text == "200"
    info = session.info()["kernel"]
    assert info["memory_interrupts"] == 1 and info["oom_kills"] == 0
    assert (info["memory_max"], info["memory_high"]) == (limit, mark)  # as the interrupt reported them


@pytest.mark.vm
async def test_a_variable_past_the_mark_is_kept_and_can_be_deleted(session):
    grown = await session.execute("chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 2**20))", timeout=300)
    assert grown.error.name == "MemoryLimitExceeded" and not grown.error.fault, grown.error
    mark = (await status(session))["memory_high"]
    # The kernel holds more than the mark now: the next cells run (without the mark) rather than
    # being interrupted by whatever they allocate.
    assert int((await session.execute("len(chunks)")).text) * 32 * MiB >= mark - 160 * MiB
    assert (await session.execute("del chunks; 'freed'")).text == "'freed'"
    assert (await status(session))["memory_current"] < mark - 200 * MiB
    # ... and the mark is armed again.
    again = await session.execute(GROW, timeout=300)
    assert again.error.name == "MemoryLimitExceeded" and not again.error.fault, again.error
    assert session.kernel.lifecycle.restarts == 0 and (await status(session))["oom_kills"] == 0


@pytest.mark.vm
async def test_an_allocation_the_interrupt_cannot_stop_is_oom_killed_and_the_kernel_restarted(session):
    st = await status(session)
    await session.execute("kept = 1")
    events = spy_events(session)
    start = time.monotonic()
    hog = await session.execute(oom_code(st["memory_max"]), timeout=300)
    took = time.monotonic() - start
    print(f"\nOOM kill of a {(st['memory_max'] + 128 * MiB) / MiB:.0f} MiB numpy.ones: the cell ended in {took:.1f} s")
    assert hog.error.name == "MemoryLimitExceeded" and hog.error.fault, hog.error
    assert "OOM killer" in hog.error.value and "variables are lost" in hog.error.value
    died = [e for e in events if e.name == Event.kernel_died]
    assert len(died) == 1 and died[0].fields["oom_killed"] is True
    # The session goes on with a fresh kernel, restarted at once.
    assert (await session.execute("1 + 1")).text == "2"
    assert (await session.execute("kept")).error.name == "NameError"
    assert session.kernel.lifecycle.restarts == 1 and await session.ping() > 0
    info = session.info()["kernel"]
    assert info["oom_kills"] == 1 and "OOM killer" in info["last_death"]


@pytest.mark.vm
async def test_a_child_process_killed_by_the_oom_killer_gives_memory_limit_exceeded(session):
    # os.system ignores SIGINT while it waits: the interrupt at the mark cannot stop the child, so
    # the OOM killer kills it (the biggest process in the kernel's cgroup), and the kernel lives.
    await session.execute("kept = 5")
    code = "import os, sys\nstatus = os.system(sys.executable + ' -c \"b = bytearray(700 * 2**20)\"')\nstatus"
    ran = await session.execute(code, timeout=300)
    assert ran.error is not None and ran.error.name == "MemoryLimitExceeded" and not ran.error.fault, ran.error
    assert "process the cell started was killed" in ran.error.value
    assert (await session.execute("kept, status != 0")).text == "(5, True)"
    assert session.kernel.lifecycle.restarts == 0 and (await status(session))["oom_kills"] >= 1


@pytest.mark.vm
async def test_a_2_gib_allocation_is_contained(manager):
    a, b = await asyncio.gather(manager.create(), manager.create())
    await a.execute("kept = 3")
    start = time.monotonic()
    huge, other = await asyncio.gather(a.execute("b = bytearray(2 * 1024**3)", timeout=300),
                                       b.execute("sum(range(10**5))", timeout=300))
    assert time.monotonic() - start < 120
    assert huge.error is not None and huge.error.name in ("MemoryError", "MemoryLimitExceeded"), huge.error
    assert other.text == "4999950000" and other.error is None
    assert await a.ping() > 0 and await b.ping() > 0
    assert (await a.execute("1 + 1")).text == "2"
    if huge.error.name == "MemoryError":  # refused outright: nothing was lost
        assert (await a.execute("kept")).text == "3"


@pytest.mark.vm
async def test_memory_limit_exceeded_over_rest_ndjson_and_session_info(api):
    sid = body(await api("POST", "/sessions", body={}))["id"]
    # JSON: the interrupted cell is an answer like any other (200), its error named.
    grown = await api("POST", f"/sessions/{sid}/execute", body={"code": GROW, "timeout": 300})
    assert grown.code == 200, grown.body
    error = body(grown)["error"]
    assert error["name"] == "MemoryLimitExceeded" and error["fault"] is False and "interrupted" in error["value"]
    # NDJSON: the OOM kill is the stream's last line, an error with fault set (no `end` line).
    memory_max = (await api.manager.get(sid).link.request(Op.kernel_status))["memory_max"]
    killed = await api("POST", f"/sessions/{sid}/execute", body={"code": oom_code(memory_max), "timeout": 300},
                       headers={"Accept": "application/x-ndjson"})
    assert killed.code == 200
    lines = [json.loads(line) for line in killed.body.splitlines() if line.strip()]
    lines = [line for line in lines if line["type"] != "keepalive"]
    assert lines[-1]["type"] == "error" and lines[-1]["name"] == "MemoryLimitExceeded" and lines[-1]["fault"] is True
    assert not any(line["type"] == "end" for line in lines)
    # The JSON door answers the OOM kill as it answers KernelDied: the result, its error a fault.
    again = await api("POST", f"/sessions/{sid}/execute", body={"code": oom_code(memory_max), "timeout": 300})
    assert again.code == 200 and body(again)["error"]["name"] == "MemoryLimitExceeded"
    assert body(again)["error"]["fault"] is True
    info = body(await api("GET", f"/sessions/{sid}"))
    assert info["state"] == "running"
    # All three cells crossed the mark and were interrupted; the numpy ones then met the OOM killer.
    assert info["kernel"]["oom_kills"] == 2 and info["kernel"]["memory_interrupts"] == 3
    assert "OOM killer" in info["kernel"]["last_death"] and info["kernel"]["memory_max"] > 0
    ok = await api("POST", f"/sessions/{sid}/execute", body={"code": "1 + 1"})
    assert ok.code == 200 and body(ok)["results"][0]["text"] == "2"


@pytest.mark.vm
async def test_memory_limit_exceeded_over_the_jupyter_websocket(api):
    kernel_id = body(await api("POST", "/api/kernels", body={}))["id"]
    ws = await connect(api, kernel_id)
    # The interrupt at the mark: the kernel itself reports MemoryLimitExceeded (the guest extension).
    msg_id, request = execute_request(GROW)
    await ws.write_message(json.dumps(request))
    msgs = await collect(ws, msg_id, timeout=300)
    (error,) = [m for m in msgs if m["msg_type"] == "error"]
    (reply,) = [m for m in msgs if m["msg_type"] == "execute_reply"]
    assert error["content"]["ename"] == "MemoryLimitExceeded" and reply["content"]["ename"] == "MemoryLimitExceeded"
    assert "interrupted" in error["content"]["evalue"]
    # The OOM kill: vmcell answers for the dead kernel, with the same name.
    memory_max = (await api.manager.get(kernel_id).link.request(Op.kernel_status))["memory_max"]
    msg_id, request = execute_request(oom_code(memory_max))
    await ws.write_message(json.dumps(request))
    msgs = await collect(ws, msg_id, timeout=300)
    (error,) = [m for m in msgs if m["msg_type"] == "error"]
    assert error["content"]["ename"] == "MemoryLimitExceeded" and "OOM killer" in error["content"]["evalue"]
    msg_id, request = execute_request("1 + 1")
    await ws.write_message(json.dumps(request))
    msgs = await collect(ws, msg_id, timeout=120)
    assert any(m["msg_type"] == "execute_result" and m["content"]["data"]["text/plain"] == "2" for m in msgs)
    ws.close()
