"""Sessions restored from the template snapshot, with real microVMs (QEMU; TCG on this host)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from interpreter.config import run_dir
from interpreter.errors import SessionLimitReached, TemplateMissing, VMMNotFound
from interpreter.sessions import SessionManager
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm


async def test_restored_session_answers_ping(manager):
    session = await manager.create()
    assert await session.ping() < 5000
    result = await session.run(["python3", "-c", "import numpy; print(numpy.arange(3).sum())"])
    assert result.returncode == 0 and result.stdout == b"3\n"


async def test_two_sessions_from_one_template_have_their_own_identity(manager):
    a, b = await asyncio.gather(manager.create(), manager.create())
    probe = ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; cat /etc/machine-id"]
    ra, rb = await asyncio.gather(a.run(probe), b.run(probe))
    rand_a, host_a, mid_a = ra.stdout.decode().split()
    rand_b, host_b, mid_b = rb.stdout.decode().split()
    assert len(rand_a) == 64 and rand_a != rand_b
    assert host_a == a.identity.hostname and host_b == b.identity.hostname and host_a != host_b
    assert mid_a != mid_b and len(mid_a) == 32


async def test_guest_clock_follows_the_host_even_from_an_old_snapshot(manager):
    session = await manager.create()
    snapshot_age = time.time() - session.template.meta["built_at"]
    guest = float((await session.run(["date", "+%s.%N"])).stdout)
    assert abs(guest - time.time()) < 2.0, f"guest clock off by {guest - time.time():.1f}s (snapshot {snapshot_age:.0f}s old)"
    # A clock hours behind (what any snapshot restored hours later starts with) is put right by the identity step.
    hours_ago = int(time.time()) - 5 * 3600
    assert (await session.run(["date", "-s", f"@{hours_ago}"])).returncode == 0
    assert float((await session.run(["date", "+%s"])).stdout) < time.time() - 4 * 3600
    await session.apply_identity()
    guest = float((await session.run(["date", "+%s.%N"])).stdout)
    assert abs(guest - time.time()) < 2.0


async def test_guest_seconds_last_as_long_as_host_seconds(manager):
    # Under TCG the guest reads the host's TSC; told a wrong frequency, its clock runs at the wrong
    # rate (it ran 22% fast here before the frequency was measured).
    session = await manager.create()
    host0, guest0 = time.time(), float((await session.run(["date", "+%s.%N"])).stdout)
    await asyncio.sleep(6)
    host1, guest1 = time.time(), float((await session.run(["date", "+%s.%N"])).stdout)
    # Each reading has its own round-trip latency (tens of ms); 3% of 6 s is 180 ms.
    assert abs((guest1 - guest0) / (host1 - host0) - 1) < 0.03, (guest1 - guest0, host1 - host0)


async def test_guest_timers_fire_on_time_without_a_pit(manager):
    # Under TCG the VM has no PIT and the guest is told its APIC timer's period instead of measuring
    # it (accel.py): told wrong, every sleep and timeout in the guest would run long or short.
    session = await manager.create()
    probe = ("import json, time\n"
             "lateness = []\n"
             "for want in (0.01, 0.05, 0.2, 0.2, 0.5):\n"
             "    t = time.monotonic(); time.sleep(want); lateness.append(time.monotonic() - t - want)\n"
             "print(json.dumps({'lateness': lateness, 'timer_list': open('/proc/timer_list').read()}))\n")
    out = json.loads((await session.run(["python3", "-c", probe])).stdout)
    assert all(late >= 0 for late in out["lateness"]), out["lateness"]  # never early
    assert sorted(out["lateness"])[2] < 0.05, out["lateness"]  # median wake-up within 50 ms (generous, TCG)
    assert "Clock Event Device: lapic" in out["timer_list"]


async def test_files_stay_in_their_session(manager):
    a = await manager.create()
    b = await manager.create()
    wrote = await a.run(["sh", "-c", "echo secret > /root/a.txt && echo tmp > /tmp/a.txt && cat /root/a.txt"])
    assert wrote.stdout == b"secret\n"
    check = ["sh", "-c", "ls /root/a.txt /tmp/a.txt 2>&1; true"]
    assert b"No such file" in (await b.run(check)).stdout
    await manager.close(a.id)
    c = await manager.create()
    out = (await c.run(check)).stdout
    assert out.count(b"No such file") == 2, out


async def test_filling_the_session_disk_fails_with_enospc_in_the_guest(manager, built_template):
    template_disk = built_template.rw_image.stat()
    session = await manager.create()
    limit_mib = built_template.spec.disk_mib
    result = await session.run(
        ["dd", "if=/dev/zero", "of=/root/fill", "bs=1M", f"count={limit_mib + 256}", "conv=fsync"], timeout=300)
    assert result.returncode != 0
    assert b"No space left on device" in result.stderr
    # The session still works, and the host side stayed bounded: the overlay is at most the limit
    # (plus qcow2 metadata), and the template's disk was never written.
    assert (await session.run(["true"])).returncode == 0
    overlay = session.vm.workdir.file("rw.qcow2").stat().st_size
    assert overlay < (limit_mib + 64) * 2**20
    after = built_template.rw_image.stat()
    assert (after.st_size, after.st_mtime_ns) == (template_disk.st_size, template_disk.st_mtime_ns)


async def test_closing_a_session_reaps_qemu_and_its_files(manager):
    before = qemu_pids()
    session = await manager.create()
    workdir, pid = session.vm.workdir.path, session.vm.pid
    assert pid in qemu_pids() and workdir.exists()
    await manager.close(session.id)
    assert pid not in qemu_pids()
    assert not workdir.exists()
    assert qemu_pids() <= before


OWNER_SCRIPT = """
import asyncio, json, sys
from interpreter.sessions import SessionManager
async def main():
    m = SessionManager()
    s = await m.create()
    print(json.dumps({"pid": s.vm.pid, "workdir": str(s.vm.workdir.path)}), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_sigkilled_owner_leaves_no_qemu_and_next_start_cleans_up(built_template):
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(await asyncio.wait_for(asyncio.to_thread(owner.stdout.readline), 120))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while info["pid"] in qemu_pids() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert info["pid"] not in qemu_pids(), "qemu outlived its SIGKILLed owner"
    assert os.path.exists(info["workdir"])  # the dead owner could not clean up...
    async with SessionManager():
        assert not os.path.exists(info["workdir"])  # ...the next start does


async def test_missing_qemu_fails_at_once_naming_the_fix(built_template, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    start = time.monotonic()
    async with SessionManager() as manager:
        with pytest.raises(VMMNotFound, match="apt-get install qemu-system-x86"):
            await manager.create()
    assert time.monotonic() - start < 5


async def test_unbuilt_template_fails_at_once_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("VMCELL_HOME", str(tmp_path))
    start = time.monotonic()
    async with SessionManager() as manager:
        with pytest.raises(TemplateMissing, match="vmcell template build python"):
            await manager.create()
        with pytest.raises(TemplateMissing, match="unknown template 'nope'.*python"):
            await manager.create("nope")
    assert time.monotonic() - start < 5
    assert not list((tmp_path / "run").glob("*"))  # nothing half-made left behind


async def test_session_limit_is_enforced_and_freed_by_close(built_template):
    async with SessionManager(max_sessions=1) as manager:
        first = await manager.create()
        with pytest.raises(SessionLimitReached, match="maximum"):
            await manager.create()
        await manager.close(first.id)
        second = await manager.create()
        assert await second.ping() > 0


def test_no_vm_left_behind_after_the_suite():
    # Runs last in this module: every test above closed what it started.
    leftovers = [p for p in run_dir().iterdir()] if run_dir().exists() else []
    assert not leftovers, leftovers
