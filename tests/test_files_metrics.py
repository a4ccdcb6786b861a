"""`sandbox.files` exists / remove / make_dir / rename and `sandbox.get_metrics()` (E2B's names and
return values) through a real server and real microVMs, sync and async."""

import asyncio
import time
from datetime import datetime

import pytest

from interpreter.client import AsyncSandbox, EntryInfo, NotFoundError, Sandbox, SandboxError, SandboxMetrics
from tests.conftest import TOKEN, body

pytestmark = pytest.mark.vm


async def test_sync_files_and_metrics(api, built_template):
    def scenario():
        with Sandbox.create(base_url=api.url, token=TOKEN) as sandbox:
            files = sandbox.files
            assert files.exists("nothing.txt") is False
            assert files.make_dir("work/deep") is True and files.make_dir("work/deep") is False
            files.write("work/deep/a.txt", "alpha")
            assert files.exists("work/deep/a.txt") and files.exists("/root/work")
            moved = files.rename("work/deep/a.txt", "work/b.txt")
            assert isinstance(moved, EntryInfo) and (moved.name, moved.path, moved.type, moved.size) == \
                ("b.txt", "/root/work/b.txt", "file", 5)
            assert files.read("work/b.txt") == "alpha" and not files.exists("work/deep/a.txt")
            listed = files.list("work")
            assert [e.name for e in listed] == ["b.txt", "deep"] and listed[1]["type"] == "dir"
            files.remove("work")  # a directory with its contents
            assert files.exists("work") is False
            assert sandbox.run_code("import os; os.path.exists('work')").text == "False"
            with pytest.raises(NotFoundError):
                files.rename("work/gone", "elsewhere")
            with pytest.raises(NotFoundError):
                files.remove("work")
            with pytest.raises(SandboxError) as root:
                files.remove("/")
            assert root.value.status == 403

            sandbox.run_code("x = bytearray(64 * 2**20)")  # the kernel holds 64 MiB more
            [metrics] = sandbox.get_metrics()  # E2B's list of samples: one, taken now
            assert isinstance(metrics, SandboxMetrics) and isinstance(metrics.timestamp, datetime)
            assert metrics.cpu_count == built_template.spec.vcpus and 0.0 <= metrics.cpu_used_pct <= 100.0
            assert 64 * 2**20 < metrics.mem_used < metrics.mem_total <= 1024 * 2**20
            assert 0 < metrics.disk_used < metrics.disk_total

    await asyncio.to_thread(scenario)


async def test_async_files_and_metrics(api):
    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as sandbox:
        assert await sandbox.files.make_dir("d") is True
        await sandbox.files.write("d/f", b"\x00\x01")
        assert await sandbox.files.exists("d/f") is True
        assert (await sandbox.files.rename("d/f", "g")).path == "/root/g"
        await sandbox.files.remove("g")
        assert await sandbox.files.exists("g") is False
        [metrics] = await sandbox.get_metrics()
        assert metrics.mem_total > 0 and metrics.disk_total > 0


async def test_files_and_metrics_rest(api):
    sid = body(await api("POST", "/sessions", {}))["id"]
    assert body(await api("GET", f"/sessions/{sid}/files/exists?path=.bashrc"))["path"] == ".bashrc"
    assert (await api("POST", f"/sessions/{sid}/files/dir", {"path": "x"})).code == 201
    assert (await api("POST", f"/sessions/{sid}/files/dir", {"path": "x"})).code == 200
    assert (await api("POST", f"/sessions/{sid}/files/remove", {"path": "x"})).code == 204
    for method, route, payload in (("GET", "files/exists", None), ("POST", "files/remove", {}),
                                   ("POST", "files/dir", {"path": 5}), ("POST", "files/rename", {"path": "a"})):
        assert (await api(method, f"/sessions/{sid}/{route}", payload)).code == 400, route
    metrics = body(await api("GET", f"/sessions/{sid}/metrics"))
    assert set(metrics) == {"cpu_count", "cpu_used_pct", "mem_used", "mem_total", "disk_used", "disk_total", "timestamp"}
    assert (await api("GET", "/sessions/nope/metrics")).code == 404
    await api("DELETE", f"/sessions/{sid}")
    assert (await api("GET", f"/sessions/{sid}/metrics")).code == 410


async def test_watch_dir_sync_and_async(api):
    from interpreter.client import FilesystemEventType as T

    def scenario():
        with Sandbox.create(base_url=api.url, token=TOKEN) as sandbox:
            sandbox.files.make_dir("watched")
            handle = sandbox.files.watch_dir("watched", recursive=True)
            sandbox.files.write("watched/a.txt", "1")
            sandbox.commands.run("mkdir watched/sub && echo 2 > watched/sub/b.txt && rm watched/a.txt")
            seen = []
            for _ in range(50):
                seen += [(e.name, e.type) for e in handle.get_new_events()]
                if ("a.txt", T.REMOVE) in seen and ("sub/b.txt", T.CREATE) in seen:
                    break
                time.sleep(0.1)
            handle.stop()
            assert seen[0] == ("a.txt", T.CREATE) and ("a.txt", T.WRITE) in seen and ("sub", T.CREATE) in seen
            assert ("sub/b.txt", T.CREATE) in seen and ("a.txt", T.REMOVE) in seen
            sandbox.files.write("watched/after.txt", "x")  # after stop(): not seen
            time.sleep(0.5)
            assert handle.get_new_events() == []
            with pytest.raises(NotFoundError):
                sandbox.files.watch_dir("no-such-dir")

    await asyncio.to_thread(scenario)
    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as sandbox:
        got = []

        async def on_event(event):
            got.append((event.name, event.type))

        handle = await sandbox.files.watch_dir(".", on_event)
        await sandbox.files.write("new.txt", "x")
        for _ in range(50):
            if ("new.txt", T.CREATE) in got:
                break
            await asyncio.sleep(0.1)
        await handle.stop()
        assert ("new.txt", T.CREATE) in got


async def test_a_watch_goes_on_across_a_pause(api):
    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as sandbox:
        got = []
        handle = await sandbox.files.watch_dir(".", lambda event: got.append(event.name))
        await sandbox.files.write("before.txt", "x")
        for _ in range(100):
            if "before.txt" in got:
                break
            await asyncio.sleep(0.1)
        assert "before.txt" in got
        await asyncio.wait_for(sandbox.pause(), 120)  # not held up by the open watch
        assert (await sandbox.get_info()).state == "saved"
        await sandbox.files.write("after.txt", "x")  # resumes it
        for _ in range(100):
            if "after.txt" in got:
                break
            await asyncio.sleep(0.1)
        await handle.stop()
        assert "after.txt" in got
