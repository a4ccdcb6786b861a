"""Sessions that outlive the server: a real `vmcell serve` stopped with SIGTERM, killed with SIGKILL,
and started again on the same state directory; real microVMs (sessions/registry.py, adopt.py)."""

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from interpreter.bench_api import free_port
from interpreter.client import NotFoundError, Sandbox
from tests.conftest import TOKEN, qemu_pids

pytestmark = pytest.mark.vm


class Server:
    """`vmcell serve` in a process of its own, on one state directory."""

    def __init__(self, state_dir):
        self.state_dir, self.port = state_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "Server":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "interpreter.cli", "serve", "--no-build", "--host", "127.0.0.1", "--port",
             str(self.port), "--token", TOKEN, "--auto-pause", "0", "--state-dir", str(self.state_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            lines.append(line)
            if "serving on" in line or not line:
                break
        assert "serving on" in lines[-1], "".join(lines)
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # never let its pipe fill
        return self

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(60)

    def get(self, path):
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"token {TOKEN}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def post(self, path, body):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"token {TOKEN}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())


def test_sessions_outlive_a_sigterm_and_a_sigkill_of_the_server(built_template, tmp_path):
    state_dir = tmp_path / "state"
    server = Server(state_dir).start()
    opts = {"base_url": server.url, "token": TOKEN}
    try:
        running = Sandbox.create(**opts)
        assert running.run_code("x = 42").error is None
        running.files.write("kept.txt", "written before the restarts")
        saved = Sandbox.create(**opts)
        assert saved.run_code("y = 7").error is None
        saved.pause()
        # the gateway's kernels are sessions; one started as python3 (the alias) keeps that name
        kernel = server.post("/api/kernels", {"name": "python3"})["id"]

        # 1. SIGTERM: a clean stop leaves the VMs for the next server.
        assert server.stop(signal.SIGTERM) == 0
        assert qemu_pids(state_dir), "the running sessions' VMs should outlive the server"
        server.start()
        again = Sandbox.connect(running.sandbox_id, **opts)
        assert again.run_code("x").text == "42"
        assert again.files.read("kept.txt") == "written before the restarts"
        assert Sandbox.connect(saved.sandbox_id, **opts).run_code("y").text == "7"
        model = server.get(f"/api/kernels/{kernel}")
        assert model["id"] == kernel and model["name"] == "python3"

        # 2. SIGKILL in the middle of a cell; and a VM whose registry row is lost meanwhile is reaped.
        before = qemu_pids(state_dir)
        stray = Sandbox.create(**opts)
        stray_qemu = qemu_pids(state_dir) - before
        assert len(stray_qemu) == 1
        failed = []
        cell = threading.Thread(target=lambda: failed.append(_raises(lambda: again.run_code(
            "import time\nfor i in range(600):\n    time.sleep(1)"))))
        cell.start()
        time.sleep(3)
        server.stop(signal.SIGKILL)
        cell.join(30)
        assert failed == [True], "the client of the cell in flight should get an error, not hang"
        with sqlite3.connect(state_dir / "registry.sqlite3") as db:
            db.execute("DELETE FROM sessions WHERE id = ?", (stray.sandbox_id,))
        server.start()
        after = Sandbox.connect(running.sandbox_id, **opts)
        interrupted = after.info["interrupted_cell"]
        assert interrupted and "server stopped while this cell ran" in interrupted["reason"], after.info
        start = time.monotonic()
        assert after.run_code("x").text == "42"  # the orphaned cell was interrupted: nothing waits behind it
        assert time.monotonic() - start < 60
        assert after.files.read("kept.txt") == "written before the restarts"
        with pytest.raises(NotFoundError):
            Sandbox.connect(stray.sandbox_id, **opts)
        assert not stray_qemu & qemu_pids(state_dir), "a VM no registry row owns should be killed"
        assert len(list((state_dir / "vms").iterdir())) == 3  # running, saved, the kernel; the stray reaped

        for sandbox_id in (running.sandbox_id, saved.sandbox_id, kernel):
            Sandbox.connect(sandbox_id, **opts).kill()
    finally:
        leftover = _stop_and_reap(server, state_dir)
    assert not leftover, "closed sessions should leave no qemu"
    assert not list((state_dir / "vms").iterdir()) and not list((state_dir / "forks").iterdir())


def test_a_jupyter_client_reconnecting_after_a_server_kill_gets_the_end_of_its_cell(built_template, tmp_path):
    from tests.test_gateway import collect, execute_request

    server = Server(tmp_path / "state").start()
    kernel = server.post("/api/kernels", {"name": "python"})["id"]
    msg_id, request = execute_request("import time\nprint('started', flush=True)\nfor i in range(600):\n"
                                      "    time.sleep(1)", session="lab-tab")

    async def send():
        ws = await _websocket(server, kernel, "lab-tab")
        await ws.write_message(json.dumps(request))
        while True:  # the cell runs
            msg = json.loads(await asyncio.wait_for(ws.read_message(), 60))
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
                return

    async def reconnect():
        ws = await _websocket(server, kernel, "lab-tab")
        return await collect(ws, msg_id, timeout=60)

    try:
        asyncio.run(send())
        server.stop(signal.SIGKILL)
        server.start()
        got = asyncio.run(reconnect())  # a frontend's [*] ends: never a cell that hangs for ever
        text = "".join(m["content"].get("text", "") for m in got if m["msg_type"] == "stream")
        assert "server restarted while this cell ran" in text, got
        (reply,) = [m for m in got if m["msg_type"] == "execute_reply"]
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt", reply
        Sandbox.connect(kernel, base_url=server.url, token=TOKEN).kill()
    finally:
        leftover = _stop_and_reap(server, tmp_path / "state")
    assert not leftover, "closed sessions should leave no qemu"


async def _websocket(server, kernel_id, session_id):
    url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={session_id}"
    return await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}))


def test_a_second_server_on_the_same_state_dir_is_refused(built_template, tmp_path):
    first = Server(tmp_path / "state").start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "interpreter.cli", "serve", "--no-build", "--port", str(free_port()),
             "--token", TOKEN, "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "another vmcell server" in second.stdout + second.stderr, second
    finally:
        first.stop()


def _stop_and_reap(server, state_dir) -> set[int]:
    """Stops the server; durable VMs outlive it, so whatever a failed test left is killed here.
    Returns the QEMUs that were still running (none, when the test closed its sessions)."""
    if server.process.poll() is None:
        server.stop(signal.SIGTERM)
    leftover = qemu_pids(state_dir)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    return leftover


def _raises(call) -> bool:
    try:
        call()
    except Exception:
        return True
    return False
