"""Prometheus metrics at /metrics: parsed with prometheus_client's own text parser, moved by real
cells, forks and egress refusals in real microVMs; behind the token unless public."""

import asyncio
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from interpreter.kernel.results import ExecutionError, ExecutionResult
from interpreter.metrics import CELL_OUTCOMES, Metrics, cell_outcome, read_proc_stat
from tests.conftest import body


def parse(text: str) -> dict:
    """{(sample name, ((label, value), ...)): value} of a scrape; fails if the text does not parse."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(api, token=True) -> dict:
    response = await api("GET", "/metrics", **({} if token else {"token": None}))
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return parse(response.body.decode())


# ---- pure logic ---------------------------------------------------------------------------------


def fake_manager():
    pool = SimpleNamespace(sizes={"python": 2}, ready=lambda name: 1, sessions=lambda: [])
    return SimpleNamespace(list=lambda: [], pool=pool, max_sessions=7)


def test_registries_are_per_manager_and_complete_from_the_start():
    first, second = Metrics(fake_manager()), Metrics(fake_manager())  # no clash: registries of their own
    first.cell_ended(SimpleNamespace(result=ExecutionResult(duration_ms=120.0), fault=None, timed_out=False,
                                     door="api", sent_at=1.0, silent=False))
    # The host's own silent cells (the pool's warm-up) are not users' cells.
    first.cell_ended(SimpleNamespace(result=ExecutionResult(duration_ms=80.0), fault=None, timed_out=False,
                                     door="api", sent_at=1.0, silent=True))
    one, two = parse(first.render().decode()), parse(second.render().decode())
    assert one[("vmcell_cells_total", (("door", "api"), ("outcome", "ok")))] == 1
    assert two[("vmcell_cells_total", (("door", "api"), ("outcome", "ok")))] == 0
    assert one[("vmcell_cell_duration_seconds_bucket", (("le", "0.25"),))] == 1
    for outcome in CELL_OUTCOMES:
        assert ("vmcell_cells_total", (("door", "gateway"), ("outcome", outcome))) in two
    assert two[("vmcell_sessions", (("state", "saved"),))] == 0
    assert two[("vmcell_pool_ready_sessions", (("template", "python"),))] == 1
    assert two[("vmcell_sessions_max", ())] == 7
    assert two[("vmcell_qemu_cpu_seconds_total", ())] == 0
    assert not [name for name, _ in one if name.endswith("_created")]  # no created-timestamp series


def test_cell_outcomes():
    def cell(error=None, fault=None, timed_out=False):
        return SimpleNamespace(result=ExecutionResult(error=error), fault=fault, timed_out=timed_out)

    assert cell_outcome(cell()) == "ok"
    assert cell_outcome(cell(ExecutionError("ValueError", "x"))) == "error"
    assert cell_outcome(cell(ExecutionError("CellTimeout", "x"), timed_out=True)) == "timeout"
    assert cell_outcome(cell(ExecutionError("MemoryLimitExceeded", "x"))) == "memory_limit"
    assert cell_outcome(cell(ExecutionError("KernelDied", "x", fault=True))) == "fault"
    assert cell_outcome(cell(ExecutionError("VMDied", "x", fault=True), fault=RuntimeError())) == "fault"


def test_proc_stat_of_this_process():
    import os

    start, cpu = read_proc_stat(os.getpid())
    assert start > 0 and cpu > 0
    assert read_proc_stat(2**22 + 12345) is None  # above pid_max: never a process


# ---- a live server ------------------------------------------------------------------------------


@pytest.mark.vm
async def test_metrics_want_the_token(api):
    for token in (None, "wrong"):
        response = await api("GET", "/metrics", token=token)
        assert response.code == 401 and body(response)["reason"] == "Unauthorized"
    await scrape(api)


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"metrics_public": True}], indirect=True)
async def test_metrics_public_with_the_flag(api):
    samples = await scrape(api, token=False)
    assert samples[("vmcell_sessions", (("state", "running"),))] == 0
    assert (await api("GET", "/sessions", token=None)).code == 401  # only /metrics is public


@pytest.mark.vm
async def test_counters_move_with_real_cells(api):
    before = await scrape(api)
    created = await api("POST", "/sessions", body={"network": {"allow": ["pypi.org"]}})
    assert created.code == 201
    sid = body(created)["id"]
    for code, timeout in (("1 + 1", None), ("1 / 0", None), ("import time; time.sleep(30)", 1)):
        request = {"code": code} if timeout is None else {"code": code, "timeout": timeout}
        assert (await api("POST", f"/sessions/{sid}/execute", body=request)).code == 200
    refused = await api("POST", f"/sessions/{sid}/execute", body={"code": (
        "import urllib.request, urllib.error\n"
        "try:\n    urllib.request.urlopen('http://example.com/', timeout=30)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)")})
    assert body(refused)["logs"]["stdout"] == ["403\n"]
    fork = await api("POST", f"/sessions/{sid}/fork", body={"count": 1})
    assert fork.code == 201
    child = body(fork)["sessions"][0]["id"]

    live = await scrape(api)
    def cells(samples, outcome):
        return samples[("vmcell_cells_total", (("door", "api"), ("outcome", outcome)))]

    for outcome, more in (("ok", 2), ("error", 1), ("timeout", 1)):  # the refusal's cell is ok too
        assert cells(live, outcome) - cells(before, outcome) == more, outcome
    assert live[("vmcell_cell_duration_seconds_count", ())] - before[("vmcell_cell_duration_seconds_count", ())] == 4
    assert live[("vmcell_egress_refusals_total", (("rule", "not-allowed"),))] == 1
    assert live[("vmcell_restore_seconds_count", ())] >= 2  # the session and the fork's child
    assert live[("vmcell_fork_seconds_count", ())] == 1
    assert live[("vmcell_sessions_created_total", (("source", "template"),))] == 1
    assert live[("vmcell_sessions_created_total", (("source", "fork"),))] == 1
    assert live[("vmcell_sessions", (("state", "running"),))] == 2
    assert live[("vmcell_qemu_processes", ())] == 2
    assert live[("vmcell_guest_memory_bytes", ())] >= 2 * 256 * 1024 * 1024
    assert live[("vmcell_qemu_resident_memory_bytes", ())] > 0
    cpu = live[("vmcell_qemu_cpu_seconds_total", ())]
    assert cpu > 0.1  # restoring and running cells under TCG costs CPU

    assert (await api("DELETE", f"/sessions/{sid}")).code == 204
    assert (await api("DELETE", f"/sessions/{child}")).code == 204
    after = await scrape(api)
    assert after[("vmcell_sessions", (("state", "running"),))] == 0
    assert after[("vmcell_qemu_processes", ())] == 0
    assert after[("vmcell_sessions_ended_total", (("state", "closed"),))] == 2
    assert after[("vmcell_qemu_cpu_seconds_total", ())] >= cpu  # exited VMs keep their CPU in the counter


@pytest.mark.vm
@pytest.mark.parametrize("api", [{"lifecycle": {"pool": {"python": 1}, "auto_pause_s": None}}], indirect=True)
async def test_pool_gauges_and_takes(api):
    ready = ("vmcell_pool_ready_sessions", (("template", "python"),))
    deadline = time.monotonic() + 120
    while (samples := await scrape(api))[ready] < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert samples[ready] == 1 and samples[("vmcell_pool_target_sessions", (("template", "python"),))] == 1
    # the pooled VM (paused, no session yet) holds guest RAM and is one of this server's QEMUs
    assert samples[("vmcell_sessions", (("state", "running"),))] == 0
    assert samples[("vmcell_qemu_processes", ())] == 1 and samples[("vmcell_guest_memory_bytes", ())] > 0
    created = await api("POST", "/sessions", body={})
    assert created.code == 201
    taken = await scrape(api)
    assert taken[("vmcell_sessions_created_total", (("source", "pool"),))] == 1
    assert taken[("vmcell_sessions_created_total", (("source", "template"),))] == 0
    assert taken[("vmcell_sessions", (("state", "running"),))] == 1
    # The pool's own warm-up cell is not a user's cell.
    assert not any(key[0] == "vmcell_cells_total" and value for key, value in taken.items())
    assert (await api("DELETE", f"/sessions/{body(created)['id']}")).code == 204
