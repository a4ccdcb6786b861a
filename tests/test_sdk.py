"""The E2B-shaped SDK against a real server with real microVMs."""

import asyncio
import base64
import contextlib
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from interpreter.client import AsyncSandbox, NotFoundError, Sandbox, SessionClosedError
from tests.conftest import TOKEN, body

pytestmark = pytest.mark.vm


async def test_sync_sandbox(api):
    def scenario():
        seen = []
        with Sandbox.create(envs={"WHO": "sdk"}, base_url=api.url, token=TOKEN) as sandbox:
            assert sandbox.run_code("x = 40").error is None
            assert sandbox.run_code("x + 2").text == "42"
            streamed = sandbox.run_code(
                "import os, sys\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\n"
                "print(os.environ['WHO'], flush=True)\n'end'",
                on_stdout=lambda m: seen.append(("out", str(m))), on_stderr=lambda m: seen.append(("err", m.line)),
                on_result=lambda r: seen.append(("result", r.text_plain)))
            assert seen == [("out", "a\n"), ("err", "b\n"), ("out", "sdk\n"), ("result", "'end'")], seen
            assert streamed.logs.stdout == ["a\n", "sdk\n"] and streamed.execution_count >= 3
            plot = sandbox.run_code("import matplotlib.pyplot as plt; plt.plot([3, 1, 2]); plt.show()")
            png = next(r for r in plot.results if "png" in r.formats())
            assert Image.open(io.BytesIO(base64.b64decode(png.png))).format == "PNG"
            late = sandbox.run_code("import time; time.sleep(30)", timeout=1)
            assert late.error.name == "CellTimeout"
            assert sandbox.run_code("x").text == "40"
            sandbox.files.write("notes/hello.txt", "written by the host\n")
            assert sandbox.run_code("open('notes/hello.txt').read()").results[0].text_plain == repr("written by the host\n")
            sandbox.run_code("open('made.bin', 'wb').write(bytes([0, 255, 7]))")
            assert sandbox.files.read("made.bin", format="bytes") == bytes([0, 255, 7])
            assert "made.bin" in [e["name"] for e in sandbox.files.list(".")]
            failed = sandbox.run_code("undefined_name", on_error=lambda e: seen.append(("error", e.name)))
            assert failed.error.name == "NameError" and seen[-1] == ("error", "NameError")
            sandbox_id = sandbox.sandbox_id
        return sandbox_id

    sandbox_id = await asyncio.to_thread(scenario)
    killed = await api("GET", f"/sessions/{sandbox_id}")  # the context manager killed it
    assert killed.code == 410 and "was closed" in body(killed)["message"]


async def test_async_sandbox_awaits_async_callbacks_in_order(api):
    got = []

    async def on_stdout(message):
        await asyncio.sleep(0.01)
        got.append(message.line)

    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as sandbox:
        execution = await sandbox.run_code("for i in range(5): print(i, flush=True)", on_stdout=on_stdout)
        assert "".join(got) == "0\n1\n2\n3\n4\n" == "".join(execution.logs.stdout)
        await sandbox.files.write("a.txt", b"bytes")
        assert await sandbox.files.read("a.txt") == "bytes"
        assert (await sandbox.run_code("len(open('a.txt').read())")).text == "5"
        await sandbox.kill()
        with pytest.raises(SessionClosedError, match=sandbox.sandbox_id):
            await sandbox.run_code("1")
    with pytest.raises(NotFoundError):  # an id the server never had
        await AsyncSandbox("no-such-id", sandbox._http, {}).run_code("1")


def readme_block(marker: str) -> str:
    """The README's ```python block containing `marker`, as users copy it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    matching = [b for b in blocks if marker in b]
    assert len(matching) == 1, f"expected one README block with {marker!r}"
    return matching[0]


async def test_the_readme_sdk_quickstart_runs_as_written(api, monkeypatch):
    monkeypatch.setenv("VMCELL_URL", api.url)
    monkeypatch.setenv("VMCELL_TOKEN", TOKEN)
    out = io.StringIO()
    code = readme_block("from interpreter.client import Sandbox")
    with contextlib.redirect_stdout(out):
        await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines == ["42", "0", "1", "2", "['text', 'png', 'chart']", "{'a': [1], 'b': [2]}", "CellTimeout"], lines
    assert not api.manager.list()
