"""Cells through the guest kernel, with real microVMs (QEMU; TCG on this host)."""

import asyncio
import base64
import io
import resource
import time

import pytest
from PIL import Image

from interpreter.errors import CellQueueFull, GuestProtocolError, SessionGone

pytestmark = pytest.mark.vm


@pytest.fixture
async def session(manager):
    return await manager.create()


def _no_ansi(lines):
    return all("\x1b" not in line for line in lines)


async def test_state_streams_and_errors(session):
    assert (await session.execute("x = 1")).results == []
    two = await session.execute("x + 1")
    assert two.text == "2" and two.results[0].is_main_result and two.error is None
    hi = await session.execute("print('hi')")
    assert hi.logs.stdout == ["hi\n"] and hi.logs.stderr == []
    err = await session.execute("import sys; print('oops', file=sys.stderr)")
    assert err.logs.stderr == ["oops\n"]
    boom = await session.execute("1/0")
    assert boom.error.name == "ZeroDivisionError" and boom.error.value == "division by zero"
    assert boom.error.traceback and _no_ansi(boom.error.traceback)
    assert any("ZeroDivisionError" in line for line in boom.error.traceback)
    assert boom.execution_count == two.execution_count + 3  # only user cells count


async def test_transforms_magics_await_and_new_input_transformers(session):
    # Each cell is transformed once (lean_execute.py): what a cell transforms must still be right, and
    # an input transformer a cell registers applies from the next cell, even to the same code.
    assert "".join((await session.execute("!echo hi")).logs.stdout).strip() == "hi"
    assert (await session.execute("%time 6*7")).text == "42"
    awaiting = "import asyncio\nawait asyncio.sleep(0)\n40 + 1"  # ipykernel transforms it once: a result is left
    assert (await session.execute(awaiting)).text == "41"
    assert (await session.execute("40 + 1")).text == "41"
    await session.execute("get_ipython().input_transformers_post.append("
                          "lambda lines: [line.replace('40 + 1', '40 + 2') for line in lines])")
    assert (await session.execute(awaiting)).text == "42"
    assert (await session.execute("40 + 1")).text == "42"
    await session.execute("get_ipython().input_transformers_post.pop()")
    assert (await session.execute("40 + 1")).text == "41"


async def test_rich_results(session):
    plot = await session.execute("import matplotlib.pyplot as plt; plt.plot([1,2,3]); plt.show()")
    (png,) = [r for r in plot.results if r.png]
    image = Image.open(io.BytesIO(base64.b64decode(png.png)))
    image.verify()
    assert image.format == "PNG" and not png.is_main_result
    frame = await session.execute("import pandas as pd; pd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    assert "<table" in frame.results[0].html and "a" in frame.results[0].text
    latex = await session.execute("display({'text/latex': r'$x$'}, raw=True)")
    assert [r.formats() for r in latex.results] == [["latex"]] and latex.results[0].latex == "$x$"
    svg = await session.execute(
        "class Dot:\n    def _repr_svg_(self):\n        return '<svg xmlns=\"http://www.w3.org/2000/svg\"/>'\nDot()")
    assert svg.results[0].svg.startswith("<svg") and "svg" in svg.results[0].formats()
    custom = await session.execute("display({'application/vnd.custom+json': {'k': 1}, 'text/plain': 'c'}, raw=True)")
    assert custom.results[0].extra == {"application/vnd.custom+json": {"k": 1}}


async def test_timeout_interrupts_and_keeps_state_restart_clears_it(session):
    await session.execute("kept = 42")
    start = time.monotonic()
    slow = await session.execute("import time; time.sleep(60)", timeout=2)
    elapsed = time.monotonic() - start
    assert slow.error.name == "CellTimeout" and elapsed < 3.0, (slow.error, elapsed)
    after = await session.execute("1 + 1")
    assert after.text == "2"
    assert (await session.execute("kept")).text == "42"
    await session.restart()
    gone = await session.execute("kept")
    assert gone.error.name == "NameError"


async def test_explicit_interrupt(session):
    task = asyncio.create_task(session.execute("import time; time.sleep(30)"))
    await asyncio.sleep(1.5)
    await session.interrupt()
    result = await asyncio.wait_for(task, 10)
    assert result.error.name == "KeyboardInterrupt"
    assert (await session.execute("'alive'")).text == "'alive'"


async def test_streaming_delivers_output_before_the_cell_ends(session):
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(1)"
    seen = []
    async for event in session.stream(code):
        seen.append((time.monotonic(), event))
    types = [e.type for _, e in seen]
    assert types[0] == "execution_count" and types[-1] == "end"
    first_stdout = next(t for t, e in seen if e.type == "stdout")
    assert seen[-1][0] - first_stdout >= 1.5
    assert "".join(e.data for _, e in seen if e.type == "stdout") == "0\n1\n2\n"


async def test_env_is_data_per_cell_and_per_session(manager):
    value = "it's \"quoted\"\nline2 $HOME `x` \\n"
    session = await manager.create(env={"SESSION_VAR": "s1", "FOO": "session-foo"})
    got = await session.execute("import os; os.environ['FOO']", env={"FOO": value})
    assert got.text == repr(value)
    assert (await session.execute("os.environ['FOO']")).text == "'session-foo'"
    assert (await session.execute("os.environ['SESSION_VAR']")).text == "'s1'"
    assert (await session.execute("os.environ.get('ONLY_ONCE')", env={"ONLY_ONCE": "1"})).text == "'1'"
    assert (await session.execute("os.environ.get('ONLY_ONCE')")).results == []  # None: no result


async def test_output_cap_truncates_and_host_memory_stays_flat(session):
    await session.execute("1")  # warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    big = await session.execute("import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)",
                                timeout=600)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert big.truncated
    kept = sum(len(s) for s in big.logs.stdout)
    assert kept <= 16 * 2**20
    assert grown_mib < 64, f"host RSS peak grew {grown_mib:.0f} MiB"
    assert (await session.execute("1 + 1")).text == "2"


async def test_input_has_no_stdin_on_this_path(session):
    result = await session.execute("input('name? ')")
    assert result.error.name == "StdinNotImplementedError"
    assert "does not support input" in result.error.value


async def test_dead_kernel_gives_an_error_and_is_restarted(session):
    """As Jupyter's restarter does: the cell that killed it says so, the next one gets a fresh kernel."""
    await session.execute("kept = 1; print('before', flush=True)")
    # (the pause lets ipykernel's IOPub thread send the print before the process vanishes)
    dead = await session.execute("print('partial', flush=True); import os, time; time.sleep(0.5); os._exit(3)",
                                 timeout=30)
    assert dead.error.name == "KernelDied" and dead.error.fault
    assert "status 3" in dead.error.value and "restarted" in dead.error.value
    assert dead.logs.stdout == ["partial\n"]
    assert (await session.execute("1 + 1")).text == "2"
    assert (await session.execute("kept")).error.name == "NameError"
    assert session.kernel.lifecycle.restarts == 1
    await session.restart()
    assert (await session.execute("1 + 1")).text == "2"


async def test_out_of_memory_kills_the_kernel_not_the_session(session):
    hog = await session.execute("hog = []\nwhile True:\n    hog.append(b'x' * (64 * 2**20))", timeout=300)
    # Interrupted at the high-water mark (the kernel keeps `hog`), or OOM-killed (a fault: a new kernel).
    assert hog.error.name in ("MemoryLimitExceeded", "MemoryError"), hog.error
    kept = hog.error.name == "MemoryError" or not hog.error.fault
    assert (await session.execute("del hog" if kept else "2 + 2")).error is None
    assert await session.ping() > 0


async def test_kernel_rngs_are_reseeded_per_session(manager):
    a, b = await asyncio.gather(manager.create(), manager.create())
    code = "import random, numpy; (random.random(), float(numpy.random.rand()))"
    ra, rb = await asyncio.gather(a.execute(code), b.execute(code))
    assert ra.text != rb.text


async def test_one_cell_at_a_time_in_order_and_a_bounded_queue(session):
    session.engine.queue_limit = 3
    order = []

    async def cell(tag, code):
        result = await session.execute(code)
        order.append(tag)
        return result

    first = asyncio.create_task(cell("a", "import time; time.sleep(1); 'a'"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(cell("b", "'b'"))
    third = asyncio.create_task(cell("c", "'c'"))
    await asyncio.sleep(0.1)
    with pytest.raises(CellQueueFull):
        await session.execute("'d'")
    results = await asyncio.gather(first, second, third)
    assert order == ["a", "b", "c"] and [r.text for r in results] == ["'a'", "'b'", "'c'"]


# Root in the guest, it takes the agent's place on the link and speaks garbage. It first leaves the
# kernel's process tree and cgroup: the agent's death takes that tree down with it.
HOSTILE = r"""
import os, signal, struct, time, glob
if os.fork() == 0:
    os.setsid()
    with open('/sys/fs/cgroup/cgroup.procs', 'w') as f:
        f.write(str(os.getpid()))
    agent = next(int(p) for p in os.listdir('/proc') if p.isdigit()
                 and b'vmcell_guest.agent' in open(f'/proc/{p}/cmdline', 'rb').read())
    port = next('/dev/' + n.split('/')[-2] for n in glob.glob('/sys/class/virtio-ports/*/name')
                if open(n).read().strip() == 'org.vmcell.agent')
    os.kill(agent, signal.SIGKILL)
    for _ in range(1000):
        try:
            fd = os.open(port, os.O_WRONLY)
            break
        except OSError:
            time.sleep(0.001)
    os.write(fd, struct.pack('>IB', 0xFFFFFFF0, 0) + b'garbage')
    time.sleep(30)
    os._exit(0)
time.sleep(30)
"""


async def test_a_hostile_guest_fails_its_session_only(manager):
    victim, bystander = await manager.create(), await manager.create()
    with pytest.raises(GuestProtocolError):
        await asyncio.wait_for(victim.execute(HOSTILE), 30)
    assert not victim.alive and victim.state.value == "dead" and "broke the link protocol" in victim.cause
    assert (await bystander.execute("6 * 7")).text == "42"
    with pytest.raises(SessionGone, match="broke the link protocol"):  # reaped at once, remembered as dead
        manager.get(victim.id)
    for _ in range(50):
        if not victim.vm.running():
            break
        await asyncio.sleep(0.1)
    assert not victim.vm.running() and not victim.vm.workdir.path.exists()
