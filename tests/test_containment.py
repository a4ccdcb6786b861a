"""The escape suite (real VMs, TCG): what a compromised QEMU, or code in the guest, can reach.

From the host side: every session's QEMU is jailed (its own uid, no capabilities, no_new_privs,
seccomp, its cgroups with limits) and sees only its own files; its uid can read neither the token,
another session's overlay, nor /etc/shadow, and cannot write the shared RAM image it maps. This
holds for restored, forked, pooled and saved-then-loaded sessions.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
from pathlib import Path

import pytest

from interpreter.config import JAIL_UID_BASE, JAIL_UID_COUNT, QEMU_MEMORY_OVERHEAD_MIB, QEMU_PIDS_MAX, vmcell_home
from interpreter.jail.files import backing_chain, qemu_runtime_files
from interpreter.sessions import SessionManager
from interpreter.sessions.settings import LifecycleSettings

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs a server running as root")

_CLONE_NEWNS = 0x00020000


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _cgroup_paths(pid: int) -> dict[str, str]:
    paths = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(","):
                paths[name] = path
    return paths


def assert_jailed(session) -> None:
    pid = session.vm.pid
    status = _status(pid)
    uid = int(status["Uid"].split()[0])
    assert JAIL_UID_BASE <= uid < JAIL_UID_BASE + JAIL_UID_COUNT, status["Uid"]
    assert set(status["Uid"].split()) == {str(uid)} and set(status["Gid"].split()) == {str(uid)}
    assert status["Groups"].strip() == ""
    assert status["Seccomp"].strip() == "2"
    assert status["NoNewPrivs"].strip() == "1"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    # Its cgroups, with limits.
    cgroups = session.vm._jailer.cgroups
    name = cgroups.of_pid(pid)
    assert name == session.workdir.id
    memory = cgroups.limits_file(name, "memory", "memory.limit_in_bytes", "memory.max")
    expected = (session.template.spec.memory_mib + QEMU_MEMORY_OVERHEAD_MIB) * 2**20
    assert int(memory.read_text()) == expected
    assert int(cgroups.limits_file(name, "pids", "pids.max", "pids.max").read_text()) == QEMU_PIDS_MAX
    assert all("/vmcell/" + name in path for c, path in _cgroup_paths(pid).items() if c in ("memory", "pids"))


def jail_view(pid: int) -> set[str]:
    """Every non-directory the QEMU's mount namespace holds, as paths inside it (its /proc aside)."""
    root = f"/proc/{pid}/root"
    seen = set()
    for directory, dirs, files in os.walk(root):
        inside = directory[len(root):] or "/"
        if inside == "/proc":
            dirs.clear()
            continue
        seen |= {os.path.join(inside, f) for f in files}
    return seen


def allowed_view(session) -> set[str]:
    config = session.vm.config
    allowed = {str(p) for p in qemu_runtime_files(Path("qemu-system-x86_64"))}
    allowed |= {"/dev/null", "/dev/urandom", str(config.kernel), str(config.initramfs)}
    for drive in config.drives:
        allowed |= {str(drive.path), *(str(p) for p in backing_chain(drive.path))}
    return allowed


def try_as(pid: int, uid: int, paths: list[str], inside: bool, write_fd_of: int | None = None) -> dict[str, str]:
    """In a child: become `uid` (in the QEMU's mount namespace if `inside`) and try to read each path
    (and, with `write_fd_of`, to write that process's guest RAM fd). Returns path -> outcome."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read)
        results = {}
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if inside:
                ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
                if libc.setns(ns, _CLONE_NEWNS) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                os.chdir("/")
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for path in paths:
                try:
                    with open(path, "rb") as f:
                        f.read(1)
                    results[path] = "read"
                except OSError as exc:
                    results[path] = type(exc).__name__
            if write_fd_of is not None:
                for fd in os.listdir(f"/proc/{write_fd_of}/fd"):
                    target = os.readlink(f"/proc/{write_fd_of}/fd/{fd}")
                    if target.startswith("/memfd:vmcell-ram"):
                        try:
                            with open(f"/proc/{write_fd_of}/fd/{fd}", "r+b") as f:
                                f.write(b"x")
                                f.flush()
                            results["ram"] = "written"
                        except OSError as exc:
                            results["ram"] = type(exc).__name__
        except BaseException as exc:  # noqa: BLE001
            results["error"] = repr(exc)
        os.write(write, json.dumps(results).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(child, 0)
    return json.loads(out)


async def test_every_kind_of_session_runs_a_jailed_qemu(manager):
    restored = await manager.create()
    assert (await restored.execute("x = 41; x + 1")).text == "42"
    assert_jailed(restored)
    (child,) = await manager.fork(restored.id, 1)
    assert (await child.execute("x")).text == "41"
    assert_jailed(child)
    assert child.vm.uid != restored.vm.uid  # a uid per VM
    await restored.save()
    await restored.ensure_running()  # loaded from disk into a new QEMU
    assert (await restored.execute("x")).text == "41"
    assert_jailed(restored)
    for session in (restored, child):
        await session.close()


async def test_a_pooled_session_runs_a_jailed_qemu(built_template):
    async with SessionManager(lifecycle=LifecycleSettings(pool={"python": 1}, auto_pause_s=None)) as manager:
        deadline = asyncio.get_running_loop().time() + 60
        while manager.pool.ready("python") < 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
        session = await manager.create()
        assert (await session.execute("1+1")).text == "2"
        assert_jailed(session)
        await session.close()


async def test_a_jailed_qemu_sees_only_its_own_files(manager):
    one, two = await asyncio.gather(manager.create(), manager.create())
    view = jail_view(one.vm.pid)
    allowed = allowed_view(one)
    own_dir = str(one.workdir.path)
    unexpected = {p for p in view if p not in allowed and not p.startswith(own_dir + "/")}
    assert not unexpected, unexpected
    assert "/usr/bin/qemu-system-x86_64" in view and str(one.vm.link_path) in view
    assert not any(p.startswith(str(two.workdir.path)) for p in view)
    assert not any("token" in p or p.startswith("/etc/shadow") for p in view)
    # Its own directory: the overlay and vmm/ only, never the server's records.
    assert {p for p in view if p.startswith(own_dir + "/")} <= {
        str(one.workdir.file("rw.qcow2")),
        *(str(one.workdir.vmm_file(n)) for n in ("link.sock", "qmp.sock", "egress.sock", "console.log"))}
    await asyncio.gather(one.close(), two.close())


async def test_the_qemu_uid_reads_no_secret_and_cannot_write_shared_ram(manager):
    token = vmcell_home() / "token"
    if not token.exists():
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text("test-token\n")
        token.chmod(0o600)
    one, two = await asyncio.gather(manager.create(), manager.create())
    other_overlay = str(two.workdir.file("rw.qcow2"))
    targets = [str(token), other_overlay, "/etc/shadow", str(one.workdir.file("qemu.pid"))]
    uid = one.vm.uid
    inside = try_as(one.vm.pid, uid, targets, inside=True, write_fd_of=one.vm.pid)
    outside = try_as(one.vm.pid, uid, targets, inside=False)
    assert "error" not in inside and "error" not in outside, (inside, outside)
    for path in targets:
        assert inside[path] in ("FileNotFoundError", "PermissionError"), (path, inside)
        assert outside[path] in ("FileNotFoundError", "PermissionError"), (path, outside)
    assert inside["ram"] == "PermissionError", inside  # the template's RAM image is a sealed memfd
    # Both sessions still work.
    texts = await asyncio.gather(one.execute("1+1"), two.execute("2+2"))
    assert [t.text for t in texts] == ["2", "4"]
    await asyncio.gather(one.close(), two.close())


async def test_closing_a_session_releases_its_jail(manager):
    session = await manager.create()
    cgroups = session.vm._jailer.cgroups
    name = session.workdir.id
    uid = session.vm.uid
    assert name in cgroups.names()
    await session.close()
    assert name not in cgroups.names()
    assert not session.vm._jailer.uids._used & {uid}


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_vm_pinning_its_vcpus_is_held_to_its_cpu_quota(manager):
    busy, quiet = await asyncio.gather(manager.create(), manager.create())
    quota = int(busy.vm._jailer.cgroups.limits_file(busy.workdir.id, "cpu", "cpu.cfs_quota_us", "cpu.max")
                .read_text().split()[0]) / 100_000
    await busy.execute("import subprocess, os\n"
                       "_busy = [subprocess.Popen(['python3', '-c', 'while True: pass']) for _ in range(4)]")
    await asyncio.sleep(1.0)
    before, start = _cpu_seconds(busy.vm.pid), asyncio.get_running_loop().time()
    answers = [await quiet.execute("1+1") for _ in range(5)]  # the quiet one answers meanwhile
    await asyncio.sleep(max(0.0, 3.0 - (asyncio.get_running_loop().time() - start)))
    used = (_cpu_seconds(busy.vm.pid) - before) / (asyncio.get_running_loop().time() - start)
    assert [a.text for a in answers] == ["2"] * 5
    assert used <= quota * 1.15, f"the busy VM used {used:.2f} cores with a quota of {quota}"
    await busy.execute("for p in _busy: p.kill()")
    await asyncio.gather(busy.close(), quiet.close())


# ---- from inside the guest --------------------------------------------------------------------

_PROBE = r'''
import json, socket, os
out = {}
def attempt(name, family, kind, address, payload=b"GET / HTTP/1.0\r\n\r\n"):
    try:
        with socket.socket(family, kind) as s:
            s.settimeout(2)
            if kind == socket.SOCK_DGRAM:
                s.sendto(payload, address)
                s.recvfrom(512)
            else:
                s.connect(address)
                s.sendall(payload)
                s.recv(1)
        out[name] = "reached"
    except OSError as exc:
        out[name] = type(exc).__name__ + ": " + str(exc)
attempt("host_loopback_service", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", PORT))
attempt("slirp_gateway", socket.AF_INET, socket.SOCK_STREAM, ("10.0.2.2", PORT))
attempt("metadata", socket.AF_INET, socket.SOCK_STREAM, ("169.254.169.254", 80))
attempt("dns_host_resolver", socket.AF_INET, socket.SOCK_DGRAM, (RESOLVER, 53), b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6)
attempt("public_dns", socket.AF_INET, socket.SOCK_DGRAM, ("8.8.8.8", 53), b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6)
try:
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    raw.close()
except OSError as exc:
    out["interfaces"] = type(exc).__name__
out["routes"] = open("/proc/net/route").read().splitlines()[1:]
print(json.dumps(out))
'''


def _host_resolver() -> str:
    try:
        for line in open("/etc/resolv.conf"):
            if line.startswith("nameserver"):
                return line.split()[1]
    except OSError:
        pass
    return "127.0.0.53"


async def test_a_guest_without_network_reaches_nothing_on_the_host(manager):
    import http.server
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        session = await manager.create()
        code = _PROBE.replace("PORT", str(server.server_address[1])).replace("RESOLVER", repr(_host_resolver()))
        result = await session.execute(code, timeout=60)
        assert result.error is None, result.error
        probes = json.loads("".join(result.logs.stdout))
        for name in ("host_loopback_service", "slirp_gateway", "metadata", "dns_host_resolver", "public_dns"):
            assert probes[name] != "reached", probes
        assert probes["interfaces"] in (["lo"], "PermissionError"), probes  # no NIC at all
        assert probes["routes"] == [], probes
        assert hits == []  # the host's loopback web server saw nothing
        assert (await session.execute("1+1")).text == "2"
        await session.close()
    finally:
        server.shutdown()
        server.server_close()


async def test_fork_bomb_disk_fill_and_2gib_are_contained_and_the_neighbour_keeps_answering(manager):
    hostile, neighbour = await asyncio.gather(manager.create(), manager.create())
    spec = hostile.template.spec
    answers: list[str] = []

    async def keep_asking():
        while True:
            answers.append((await neighbour.execute("6*7")).text)
            await asyncio.sleep(0.2)

    asking = asyncio.ensure_future(keep_asking())
    try:
        bomb = await hostile.execute("import os\nwhile True:\n    os.fork()", timeout=20)
        assert bomb.error is not None
        assert (await hostile.execute("1+1", timeout=60)).text == "2"
        # A disk fill stops at the session's writable layer: ENOSPC in the guest.
        fill = await hostile.execute(
            "import errno\nchunk = b'x' * (8 << 20)\nwritten = 0\n"
            "try:\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n"
            "            f.write(chunk); f.flush(); written += len(chunk)\n"
            "except OSError as exc:\n    print(exc.errno == errno.ENOSPC, written >> 20)\n", timeout=300)
        assert fill.error is None, fill.error
        enospc, written_mib = "".join(fill.logs.stdout).split()
        assert enospc == "True" and int(written_mib) <= spec.disk_mib, fill.logs.stdout
        overlay_mib = hostile.workdir.file("rw.qcow2").stat().st_blocks * 512 / 2**20
        assert overlay_mib <= spec.disk_mib * 1.1 + 16, overlay_mib  # the host's disk pays at most the layer
        assert (await hostile.execute("import os; os.remove('/tmp/fill'); 1+1")).text == "2"
        # 2 GiB at once in a 1 GiB guest: refused (MemoryError) or stopped at the kernel's limit.
        big = await hostile.execute("x = bytearray(2 * 1024**3)", timeout=120)
        assert big.error is not None and big.error.name in ("MemoryError", "MemoryLimitExceeded"), big.error
        assert (await hostile.execute("1+1", timeout=60)).text == "2"
        assert hostile.vm.running()  # QEMU itself never met its host cgroup's memory limit
    finally:
        asking.cancel()
    assert answers and set(answers) == {"42"}, answers[-5:]
    await asyncio.gather(hostile.close(), neighbour.close())


def _sealed_memfds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:vmcell-ram"):
            found.append(target)
    return found


async def test_managers_in_one_process_share_one_sealed_copy_of_the_template_ram(built_template):
    async with SessionManager() as first, SessionManager() as second:
        one, two = await first.create(), await second.create()
        assert one.vm._jailer is two.vm._jailer
        assert len(_sealed_memfds()) == 1, _sealed_memfds()
        await asyncio.gather(one.close(), two.close())
