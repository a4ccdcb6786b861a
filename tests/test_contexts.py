"""Code contexts and languages (E2B's create_code_context / run_code(language=...)): real microVMs
through the real server and SDK; unit tests of the link's slot encoding (a hostile guest's frames)."""

import asyncio
import json
import struct

import pytest

from interpreter.client import AsyncSandbox, Context, NotFoundError, Sandbox, SandboxError
from interpreter.config import MAX_CONTEXTS
from interpreter.errors import GuestProtocolError
from interpreter.kernel.link import GuestLink
from tests.conftest import TOKEN, body
from vmcell_guest.wire import (
    MAX_CONTEXT_SLOT,
    Channel,
    FrameDecoder,
    ProtocolError,
    channel_byte,
    encode_frame,
    encode_multipart,
    split_channel_byte,
)

# Values that would break any code they were spliced into, bash's or Python's.
NASTY = {"QUOTED": "it's \"quoted\" `uname` $HOME \\n", "MULTI": "one\ntwo\n  three", "DOLLAR": "$(touch /tmp/pwned)$PATH"}

DURABLE = {"lifecycle": {"auto_pause_s": None, "state_dir": "tmp"}}


# ---- the link: slots in the channel byte (no VM) ----------------------------------------------


def test_channel_byte_encodes_slot_and_channel_and_rejects_the_impossible():
    assert channel_byte(Channel.SHELL, 0) == 1 and channel_byte(Channel.IOPUB, 3) == 3 * 8 + 2
    for slot in range(MAX_CONTEXT_SLOT + 1):
        for channel in Channel:
            if slot and channel == Channel.CONTROL:
                continue
            assert split_channel_byte(channel_byte(channel, slot)) == (slot, channel)
    with pytest.raises(ProtocolError):
        channel_byte(Channel.CONTROL, 1)  # control is slot 0's
    with pytest.raises(ProtocolError):
        channel_byte(Channel.SHELL, MAX_CONTEXT_SLOT + 1)
    frames = FrameDecoder().feed(encode_multipart(Channel.IOPUB, [b"a"], slot=2) + encode_multipart(Channel.SHELL, [b"b"]))
    assert [(f.slot, f.channel) for f in frames] == [(2, Channel.IOPUB), (0, Channel.SHELL)]


@pytest.mark.parametrize("byte", [5, 6, 7, 8, 8 * 3 + 5, (MAX_CONTEXT_SLOT + 1) * 8 + 1, 255])
def test_the_decoder_refuses_hostile_channel_bytes(byte):
    """Channel 0 of a context slot, channels 5-7 of any slot, slots past the last: protocol errors."""
    with pytest.raises(ProtocolError, match="unknown channel"):
        FrameDecoder().feed(struct.pack(">IB", 1, byte))


async def test_the_link_refuses_frames_of_slots_never_opened_and_drops_late_ones_of_removed_ones():
    """A guest talking on a context slot the host never opened breaks the protocol (the link closes);
    frames of a context the host removed (its last output, in flight) are dropped, the link lives."""
    reader = asyncio.StreamReader()
    link = GuestLink(reader, _NullWriter())
    link._decoder._decoder = FrameDecoder(between=link._decoder.marker)  # synced, as after a handshake
    got = []
    link.set_slot_handler(3, got.append)
    reader.feed_data(encode_multipart(Channel.IOPUB, [b"x"], slot=3))
    await asyncio.sleep(0.05)
    assert [f.slot for f in got] == [3]
    link.set_slot_handler(3, None)  # removed: late frames are dropped
    reader.feed_data(encode_multipart(Channel.IOPUB, [b"late"], slot=3))
    await asyncio.sleep(0.05)
    assert link.dropped_frames == 1 and link.failure is None
    reader.feed_data(encode_frame(Channel.IOPUB, b"\x00\x01\x00\x00\x00\x01y", slot=5))  # never opened
    await asyncio.sleep(0.05)
    assert isinstance(link.failure, GuestProtocolError) and "slot 5" in str(link.failure)
    await link.close()


class _NullWriter:
    def write(self, data):
        pass

    async def drain(self):
        pass

    def close(self):
        pass


def test_bash_env_commands_carry_any_value_as_data_and_restore_what_was_there():
    """bashenv.py's commands, run by the host's bash: the values come out byte for byte (quotes,
    newlines, $, backquotes, non-ASCII), names that are not identifiers are skipped, and a per-cell
    variable is put back (set, or unset) after the cell."""
    import subprocess

    from vmcell_guest.bashenv import bash_quote, export_commands, restore_commands, save_commands

    values = {**NASTY, "UNI": "naïve ☃ \t\x01 end", "EMPTY": ""}
    script = "\n".join([
        "export KEEP=old; unset GONE",
        *save_commands(["KEEP", "GONE", *values]),
        *export_commands({"KEEP": "cell", "GONE": "cell", "bad name": "x", "1X": "y", **values}),
        *(f'printf "%s\\0" "${name}"' for name in ["KEEP", "GONE", *values]),
        *restore_commands(["KEEP", "GONE", *values]),
        'printf "%s\\0" "${KEEP-unset}" "${GONE-unset}" "${QUOTED-unset}"',
        "[ -e /tmp/pwned ] && echo PWNED; true",
    ])
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout.decode()
    assert out.split("\0") == ["cell", "cell", *values.values(), "old", "unset", "unset", ""]
    assert bash_quote("a'b") == "$'a\\x27b'"
    with pytest.raises(ValueError):
        bash_quote("nul\0byte")


# ---- real VMs through the REST API ------------------------------------------------------------



async def _run(api, sid, code, **kw):
    response = await api("POST", f"/sessions/{sid}/execute", {"code": code, **kw})
    return response, (body(response) if response.body else None)


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"max_sessions": 1}], indirect=True)
async def test_contexts_isolate_variables_share_files_and_honour_cwd(api):
    created = await api("POST", "/sessions", {"env": {"SESSION_VAR": "from the session"}})
    sid = body(created)["id"]
    assert body(created)["contexts"] == [{"id": "default", "language": "python", "cwd": "/root"}]

    made = await api("POST", f"/sessions/{sid}/contexts", {"language": "python", "cwd": "/tmp/work"})
    assert made.code == 201, made.body
    ctx = body(made)
    assert ctx["language"] == "python" and ctx["cwd"] == "/tmp/work" and ctx["id"] != "default"

    # Variables are the context's own; files are the VM's.
    assert (await _run(api, sid, "x = 'default'"))[1]["error"] is None
    assert (await _run(api, sid, "x = 'context'; open('/root/shared.txt', 'w').write('from ctx')",
                       context=ctx["id"]))[1]["error"] is None
    assert (await _run(api, sid, "x"))[1]["results"][0]["text"] == "'default'"
    assert (await _run(api, sid, "x", context=ctx["id"]))[1]["results"][0]["text"] == "'context'"
    assert (await _run(api, sid, "open('/root/shared.txt').read()"))[1]["results"][0]["text"] == "'from ctx'"
    # cwd, and the shell escape sees it too; the session env reached the context's kernel.
    _, got = await _run(api, sid, "import os; print(os.getcwd()); print(os.environ['SESSION_VAR'])\n!pwd",
                        context=ctx["id"])
    assert "".join(got["logs"]["stdout"]).split() == ["/tmp/work", "from", "the", "session", "/tmp/work"], got

    # bash: a context of its own with `language` alone, made on first use and kept.
    _, got = await _run(api, sid, 'echo "hello from ${0##*/}"; cd /tmp; pwd; BASHVAR=kept', language="bash")
    assert got["error"] is None and "hello from bash" in "".join(got["logs"]["stdout"]), got
    _, got = await _run(api, sid, 'echo "$BASHVAR $PWD $SESSION_VAR"', language="bash")
    assert "".join(got["logs"]["stdout"]).strip() == "kept /tmp from the session", got
    listed = body(await api("GET", f"/sessions/{sid}/contexts"))["contexts"]
    assert [c["language"] for c in listed] == ["python", "python", "bash"], listed
    bash_id = listed[2]["id"]
    assert listed[2]["cwd"] == "/root"
    # a bash context with its own cwd
    bash_tmp = body(await api("POST", f"/sessions/{sid}/contexts", {"language": "bash", "cwd": "/var"}))
    _, got = await _run(api, sid, "pwd; cat /root/shared.txt", context=bash_tmp["id"])
    assert "".join(got["logs"]["stdout"]).split() == ["/var", "from", "ctx"], got
    # a failing bash command is an error (its exit status)
    _, got = await _run(api, sid, "false", context=bash_tmp["id"])
    assert got["error"] is not None and got["error"]["value"] == "1", got

    # Env values as data: session env + per-cell envs with quotes, newlines and $ (bash and python).
    script = 'printf "[%s]" "$QUOTED" "$MULTI" "$DOLLAR"; [ -e /tmp/pwned ] && echo PWNED || true'
    _, got = await _run(api, sid, script, context=bash_id, env=NASTY)
    out = "".join(got["logs"]["stdout"]).removesuffix("\n")  # bash_kernel ends a last partial line
    assert got["error"] is None and out == "".join(f"[{NASTY[k]}]" for k in ("QUOTED", "MULTI", "DOLLAR")), (out, got)
    _, got = await _run(api, sid, 'echo "${QUOTED-unset} ${MULTI-unset}"', context=bash_id)
    assert "".join(got["logs"]["stdout"]).strip() == "unset unset", got  # per-cell: restored after
    _, got = await _run(api, sid, "import os; print([os.environ[k] for k in ('QUOTED', 'MULTI', 'DOLLAR')])",
                        context=ctx["id"], env=NASTY)
    assert "".join(got["logs"]["stdout"]).strip() == repr([NASTY[k] for k in ("QUOTED", "MULTI", "DOLLAR")])

    # restart clears the context's state only
    restarted = await api("POST", f"/sessions/{sid}/contexts/{ctx['id']}/restart")
    assert restarted.code == 200 and body(restarted) == ctx
    _, got = await _run(api, sid, "x", context=ctx["id"])
    assert got["error"]["name"] == "NameError"
    _, got = await _run(api, sid, "import os; os.getcwd()", context=ctx["id"])
    assert got["results"][0]["text"] == "'/tmp/work'"  # the same cwd after the restart
    assert (await _run(api, sid, "x"))[1]["results"][0]["text"] == "'default'"
    _, got = await _run(api, sid, 'echo "$BASHVAR"', context=bash_id)
    assert "".join(got["logs"]["stdout"]).strip() == "kept"

    # Clear errors.
    both, got = await _run(api, sid, "1", context=ctx["id"], language="python")
    assert both.code == 400 and "not both" in got["message"]
    unknown, got = await _run(api, sid, "1", context="nope")
    assert unknown.code == 404 and "'nope'" in got["message"] and got["error"] == "ContextNotFound"
    bad = await api("POST", f"/sessions/{sid}/contexts", {"language": "cobol"})
    assert bad.code == 400 and "python, bash" in body(bad)["message"], body(bad)
    bad, got = await _run(api, sid, "1", language="r")
    assert bad.code == 400 and "python, bash" in got["message"]
    bad = await api("POST", f"/sessions/{sid}/contexts", {"cwd": "relative/dir"})
    assert bad.code == 400
    default = await api("DELETE", f"/sessions/{sid}/contexts/default")
    assert default.code == 400

    # remove, then use: 404 naming it
    removed = await api("DELETE", f"/sessions/{sid}/contexts/{ctx['id']}")
    assert removed.code == 204
    gone, got = await _run(api, sid, "1", context=ctx["id"])
    assert gone.code == 404 and ctx["id"] in got["message"]
    assert (await api("DELETE", f"/sessions/{sid}/contexts/{ctx['id']}")).code == 404
    streamed = await api("POST", f"/sessions/{sid}/execute", {"code": "1", "context": ctx["id"]},
                         headers={"Accept": "application/x-ndjson"})
    assert streamed.code == 404

    # the limit: 409 past MAX_CONTEXTS besides the default
    have = len(body(await api("GET", f"/sessions/{sid}/contexts"))["contexts"]) - 1
    for _ in range(MAX_CONTEXTS - have):
        assert (await api("POST", f"/sessions/{sid}/contexts", {"language": "bash"})).code == 201
    full = await api("POST", f"/sessions/{sid}/contexts", {"language": "bash"})
    assert full.code == 409 and str(MAX_CONTEXTS) in body(full)["message"]
    # every context still answers, and the default too
    _, got = await _run(api, sid, "echo still", context=bash_tmp["id"])
    assert "".join(got["logs"]["stdout"]).strip() == "still"
    assert (await _run(api, sid, "x"))[1]["results"][0]["text"] == "'default'"


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"max_sessions": 1}], indirect=True)
async def test_interrupting_a_busy_bash_and_python_context(api):
    sid = body(await api("POST", "/sessions", {}))["id"]
    py = body(await api("POST", f"/sessions/{sid}/contexts", {"language": "python"}))
    sh = body(await api("POST", f"/sessions/{sid}/contexts", {"language": "bash"}))
    for ctx, code, check in ((py, "import time\nwhile True: time.sleep(0.1)", "1 + 1"),
                             (sh, "sleep 600", "echo after")):
        cell = asyncio.ensure_future(_run(api, sid, code, context=ctx["id"]))
        await asyncio.sleep(3)
        assert not cell.done()
        assert (await _run(api, sid, "'default is free'"))[1]["results"][0]["text"] == "'default is free'"
        interrupted = await api("POST", f"/sessions/{sid}/contexts/{ctx['id']}/interrupt")
        assert interrupted.code == 204
        response, got = await asyncio.wait_for(cell, 30)
        assert response.code == 200, got
        if ctx is py:
            assert got["error"]["name"] == "KeyboardInterrupt", got
        # the context runs the next cell
        _, after = await _run(api, sid, check, context=ctx["id"])
        assert after["error"] is None and (after["results"] or after["logs"]["stdout"]), after


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"max_sessions": 3, **DURABLE}], indirect=True)
async def test_contexts_survive_save_and_load_and_fork_children_inherit_them(api):
    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as parent:
        ctx = await parent.create_code_context(language="python", cwd="/tmp")
        await parent.run_code("y = 7", context=ctx)
        await parent.run_code("SAVED=yes", language="bash")
        await parent.pause()  # saved to disk, its RAM freed; the next call loads it
        assert (await parent.run_code("y * 6", context=ctx)).text == "42"
        assert (await parent.run_code('echo "$SAVED"', language="bash")).logs.stdout == ["yes\n"]
        children = await parent.fork(count=1)
        try:
            child = children[0]
            listed = await child.list_code_contexts()
            assert [c.id for c in listed] == [c.id for c in await parent.list_code_contexts()]
            assert (await child.run_code("y", context=ctx.id)).text == "7"
            assert (await child.run_code('echo "$SAVED $PWD"', language="bash")).logs.stdout == ["yes /root\n"]
            await child.run_code("y = 0", context=ctx)
            assert (await parent.run_code("y", context=ctx)).text == "7"  # each its own VM
            await child.remove_code_context(ctx)
            assert (await parent.run_code("y", context=ctx)).text == "7"
        finally:
            for child in children:
                await child.kill()


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"max_sessions": 1}], indirect=True)
async def test_the_sync_and_async_sdk(api):
    def scenario():
        with Sandbox.create(base_url=api.url, token=TOKEN) as sandbox:
            ctx = sandbox.create_code_context(language="bash", cwd="/tmp")
            assert isinstance(ctx, Context) and ctx.language == "bash" and ctx.cwd == "/tmp"
            assert sandbox.run_code("echo $PWD", context=ctx).logs.stdout == ["/tmp\n"]
            assert sandbox.run_code("echo $HOME", language="bash").logs.stdout == ["/root\n"]
            with pytest.raises(ValueError, match="not both"):
                sandbox.run_code("1", language="python", context=ctx)
            assert [c.id for c in sandbox.list_code_contexts()][0] == "default"
            sandbox.restart_code_context(ctx.id)
            sandbox.remove_code_context(ctx)
            with pytest.raises(NotFoundError):
                sandbox.run_code("echo x", context=ctx)
            with pytest.raises(SandboxError) as bad:
                sandbox.create_code_context(language="cobol")
            assert bad.value.status == 400
            return len(sandbox.list_code_contexts())

    assert await asyncio.to_thread(scenario) == 2  # the default and bash's default context

    async with await AsyncSandbox.create(base_url=api.url, token=TOKEN) as sandbox:
        ctx = await sandbox.create_code_context(cwd="/tmp")
        assert (await sandbox.run_code("import os; os.getcwd()", context=ctx)).text == "/tmp"  # E2B: no quotes
        with pytest.raises(ValueError):
            await sandbox.run_code("1", language="bash", context=ctx.id)
        await sandbox.restart_code_context(ctx)
        await sandbox.remove_code_context(ctx.id)
        assert [c.id for c in await sandbox.list_code_contexts()] == ["default"]


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"max_sessions": 1}], indirect=True)
async def test_a_gateway_kernel_started_with_the_bash_kernelspec_runs_bash(api):
    from tests.test_gateway import collect, connect, execute_request

    specs = body(await api("GET", "/api/kernelspecs"))["kernelspecs"]
    assert specs["bash"]["spec"]["language"] == "bash" and specs["python"]["spec"]["language"] == "python"
    created = await api("POST", "/api/kernels", body={"name": "bash"})
    assert created.code == 201, created.body
    kernel = body(created)
    assert kernel["name"] == "bash" and body(await api("GET", f"/api/kernels/{kernel['id']}"))["name"] == "bash"
    ws = await connect(api, kernel["id"])
    try:
        msg_id, request = execute_request('echo "bash says $((6 * 7))"; cd /tmp')
        ws.write_message(json.dumps(request))
        got = await collect(ws, msg_id)
        text = "".join(m["content"]["text"] for m in got if m["msg_type"] == "stream")
        assert text.strip() == "bash says 42", got
        assert next(m for m in got if m["msg_type"] == "execute_reply")["content"]["status"] == "ok"
        # interrupt reaches the bash kernel
        msg_id, request = execute_request("sleep 300")
        ws.write_message(json.dumps(request))
        await asyncio.sleep(2)
        assert (await api("POST", f"/api/kernels/{kernel['id']}/interrupt")).code == 204
        got = await collect(ws, msg_id)
        assert next(m for m in got if m["msg_type"] == "execute_reply")["content"]["status"] in ("abort", "aborted", "error")
        msg_id, request = execute_request("pwd")
        ws.write_message(json.dumps(request))
        got = await collect(ws, msg_id)
        assert "".join(m["content"]["text"] for m in got if m["msg_type"] == "stream").strip() == "/tmp"
    finally:
        ws.close()
    # the same session over REST: python in its default context, bash in the gateway's
    _, got = await _run(api, kernel["id"], "import os; os.getcwd()")
    assert got["results"][0]["text"] == "'/root'"
    _, got = await _run(api, kernel["id"], "pwd", language="bash")
    assert "".join(got["logs"]["stdout"]).strip() == "/tmp"
    assert (await api("DELETE", f"/api/kernels/{kernel['id']}")).code == 204


@pytest.mark.vm
def test_contexts_outlive_a_server_restart(built_template, tmp_path):
    """A durable session's contexts are in its registry row: a restarted server re-attaches them."""
    import signal

    from tests.test_durable import Server, _stop_and_reap

    server = Server(tmp_path / "state").start()
    opts = {"base_url": server.url, "token": TOKEN}
    try:
        sandbox = Sandbox.create(**opts)
        ctx = sandbox.create_code_context(cwd="/tmp")
        assert sandbox.run_code("z = 'in a context'", context=ctx).error is None
        assert sandbox.run_code("KEPT=bash", language="bash").error is None
        assert server.stop(signal.SIGTERM) == 0
        server.start()
        again = Sandbox.connect(sandbox.sandbox_id, **opts)
        assert [c.id for c in again.list_code_contexts()] == [c.id for c in sandbox.list_code_contexts()]
        assert again.run_code("z", context=ctx).text == "in a context"
        assert again.run_code('echo "$KEPT"', language="bash").logs.stdout == ["bash\n"]
        assert again.run_code("import os; os.getcwd()", context=ctx.id).text == "/tmp"
        again.kill()
    finally:
        leftover = _stop_and_reap(server, tmp_path / "state")  # durable VMs outlive the server
    assert not leftover, "a closed session should leave no qemu"


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"max_sessions": 1}], indirect=True)
async def test_the_readme_contexts_example_runs_as_written(api, monkeypatch):
    import ast
    import contextlib
    import io

    from tests.test_sdk import readme_block

    monkeypatch.setenv("VMCELL_URL", api.url)
    monkeypatch.setenv("VMCELL_TOKEN", TOKEN)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        await asyncio.to_thread(exec, compile(readme_block("create_code_context"), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["1", "False", "demo /root"], lines
    ids = ast.literal_eval(lines[3])
    assert ids[0] == "default" and len(ids) == 3, lines
