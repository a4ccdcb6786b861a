"""The `vmcell` command as users run it: `vmcell run` and `vmcell bench api`, `exec` and `ab`, on real VMs."""

import asyncio
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from interpreter.config import REPO_ROOT
from interpreter.kernel.results import ExecutionError, Result
from interpreter.run import CellPrinter
from tests.conftest import TOKEN, qemu_pids

PLOT = "import matplotlib.pyplot as plt; plt.plot([3, 1, 2]); plt.show()"


def vmcell(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "interpreter.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_printer_writes_images_without_overwriting_and_prints_text(tmp_path):
    (tmp_path / "output-1.png").write_bytes(b"the user's own file")
    out, err = io.StringIO(), io.StringIO()
    printer = CellPrinter(tmp_path, stdout=out, stderr=err)
    printer.on_stdout("hello\n")
    printer.on_result(Result(text="<Figure>", png="iVBORw0KGgo=", is_main_result=False))
    printer.on_result(Result(text="42", html="<b>42</b>", is_main_result=True))
    printer.on_result(Result(latex="$x^2$"))
    printer.on_result(Result(png="not base64!"))
    printer.on_result(Result(extra={"application/x-custom": {}}))
    printer.on_error(ExecutionError("ZeroDivisionError", "division by zero", ["Traceback", "ZeroDivisionError: x"]))
    assert (tmp_path / "output-1.png").read_bytes() == b"the user's own file"
    assert (tmp_path / "output-2.png").read_bytes() == b"\x89PNG\r\n\x1a\n"
    assert out.getvalue() == (f"hello\n[png] {tmp_path / 'output-2.png'}\n42\n$x^2$\n"
                              "[png: not valid base64, not written]\n[result in application/x-custom: not printable]\n")
    assert "<Figure>" not in out.getvalue()
    assert err.getvalue() == "Traceback\nZeroDivisionError: x\n" and printer.failed


@pytest.mark.vm
def test_vmcell_run_prints_streams_and_results_writes_images_and_stops_at_an_error(built_template, tmp_path):
    before = qemu_pids()
    done = vmcell("run", "x = 41", "print(x + 1)", PLOT, "'sum', x + 1", "import sys; sys.stderr.write('warn\\n')",
                  "1/0", "print('not reached')", "--out-dir", str(tmp_path), "--env", "GREETING=hi there")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "42" and lines[2] == "('sum', 42)" and "not reached" not in done.stdout
    assert lines[1] == f"[png] {tmp_path / 'output-1.png'}"
    assert Image.open(tmp_path / "output-1.png").size[0] > 100
    assert "warn\n" in done.stderr and "ZeroDivisionError" in done.stderr
    env = vmcell("run", "import os; os.environ['GREETING']", "--env", "GREETING=hi there")
    assert env.returncode == 0 and env.stdout == "'hi there'\n", env.stderr
    assert qemu_pids() <= before  # each run closed its VM


def test_vmcell_run_rejects_bad_input_clearly():
    bad_env = vmcell("run", "1", "--env", "NOEQUALS", timeout=60)
    assert bad_env.returncode == 2 and "NAME=VALUE" in bad_env.stderr
    bad_timeout = vmcell("run", "1", "--timeout", "0", timeout=60)
    assert bad_timeout.returncode == 2 and "--timeout" in bad_timeout.stderr
    no_server = vmcell("run", "1", "--url", "http://127.0.0.1:9", "--token", "t", timeout=60)
    assert no_server.returncode == 1 and "http://127.0.0.1:9" in no_server.stderr


@pytest.mark.vm
async def test_vmcell_run_on_a_server(api, tmp_path):
    done = await asyncio.to_thread(vmcell, "run", "y = 6 * 7", "y", PLOT, "--url", api.url, "--token", TOKEN,
                                   "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["42", f"[png] {tmp_path / 'output-1.png'}"]
    assert not api.manager.list()  # the CLI killed its sandbox


@pytest.mark.vm
def test_bench_api_measures_rest_websocket_and_a_native_gateway(built_template):
    done = vmcell("bench", "api", "--runs", "3", "--json", timeout=400)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accel"] in ("tcg", "kvm") and result["runs"] == 3
    for key in ("vmcell_rest_ms", "vmcell_rest_kernel_ms", "vmcell_websocket_ms", "native_gateway_websocket_ms",
                "native_direct_ms"):
        assert 0 < result[key]["p50"] <= result[key]["p95"], key
    assert result["ipykernel_guest"] == result["ipykernel_native"]


@pytest.mark.vm
def test_bench_exec_reports_host_guest_and_in_guest_figures(built_template):
    done = vmcell("bench", "exec", "--runs", "2", "--json", timeout=400)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("simple_ms", "guest_simple_ms", "in_guest_direct_ms", "png_ms"):
        assert 0 < result[key]["p50"] <= result[key]["p95"], key
    # Busy -> idle is inside the host-timed round trip (both clocks tick at the same rate now).
    assert result["guest_simple_ms"]["p50"] < result["simple_ms"]["p50"]


@pytest.mark.vm
def test_bench_ab_interleaves_two_checkouts_and_checks_their_answers(built_template, tmp_path):
    # This checkout against itself (same template, so no build): both sides measured, paired per round.
    done = vmcell("bench", "ab", str(REPO_ROOT), "--rounds", "2", "--cells", "2", "--code", "print(6 * 7)", "--json",
                  timeout=400)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accel"] in ("tcg", "kvm") and result["rounds"] == 2 and result["code"] == "print(6 * 7)"
    for side in ("a", "b"):
        cell_ms = result[side]["cell_ms"]
        assert result[side]["cpu_s_per_cell"] > 0 and 0 < cell_ms["p50"] <= cell_ms["p95"]
    assert result["b_cheaper_in"] in ("0/2", "1/2", "2/2") and isinstance(result["a_minus_b_median"], float)
    not_a_checkout = vmcell("bench", "ab", str(tmp_path), timeout=60)
    assert not_a_checkout.returncode != 0 and "not a vmcell checkout" in not_a_checkout.stderr
