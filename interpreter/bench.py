"""`vmcell bench`: latency figures measured on this machine, with the accelerator they were measured on."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass, replace

from .bench_native import ensure_native_env, native_kernel
from .config import DEFAULT_TEMPLATE
from .sessions import SessionManager
from .templates import cold_booted
from .vm.workdir import Workdir


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Stats:
    samples: list[float]

    def summary(self) -> dict:
        return {"p50": round(percentile(self.samples, 50), 1), "p95": round(percentile(self.samples, 95), 1),
                "max": round(max(self.samples), 1)}


async def cold_boot_ms(manager: SessionManager, template: str) -> float:
    """Request to first answered ping for a VM booted from scratch (same images, no snapshot)."""
    built = await manager.catalog.get(template)
    start = time.perf_counter()
    overlay_dir = Workdir.create()  # holds the fresh disk overlay for this boot
    try:
        writable = await manager.backend.overlay(built.rw_empty_image, overlay_dir.file("rw.qcow2"))
        # A plain cold boot: fresh disk, anonymous RAM, nothing from the snapshot.
        async with cold_booted(manager.backend, replace(built.vm_config(writable), memory_file=None),
                               "bench cold boot") as (_, agent):
            await agent.ping()
            return (time.perf_counter() - start) * 1000
    finally:
        overlay_dir.remove()


async def restore_ms(manager: SessionManager, template: str) -> float:
    """Request to first answered ping for a session restored from the template snapshot."""
    start = time.perf_counter()
    session = await manager.create(template)
    try:
        await session.ping()
        return (time.perf_counter() - start) * 1000
    finally:
        await manager.close(session.id)


async def bench_create(runs: int, template: str = DEFAULT_TEMPLATE, cold_runs: int | None = None,
                       progress=None) -> dict:
    async with SessionManager() as manager:
        built = await manager.catalog.get(template)
        restore = []
        for i in range(runs):
            restore.append(await restore_ms(manager, template))
            if progress:
                progress(f"restore {i + 1}/{runs}: {restore[-1]:.0f} ms")
        cold = []
        for i in range(cold_runs if cold_runs is not None else runs):
            cold.append(await cold_boot_ms(manager, template))
            if progress:
                progress(f"cold boot {i + 1}/{len(cold) if cold_runs is None else cold_runs}: {cold[-1]:.0f} ms")
    return {
        "accel": built.accel.name,
        "runs": runs,
        "template": template,
        "cold_boot_ms": Stats(cold).summary(),
        "restore_ms": Stats(restore).summary(),
    }


SIMPLE_CELL = "1+1"
PNG_CELL = "import matplotlib.pyplot as plt; plt.plot([1, 2, 3]); plt.show()"
# The same 1+1 from a jupyter_client inside the guest to a second, fresh kernel there: what a cell
# costs with no link, agent or host in the way, so the difference is what those add. The second
# kernel flushes its streams as the session's does (lean_flush.py, which the session's kernel gets
# from vmcell's IPython extension); its client shares the guest's vCPU with it.
IN_GUEST_DIRECT_CELL = """
import json, time
from jupyter_client.manager import start_new_kernel
_km, _kc = start_new_kernel(kernel_name="python3", extra_arguments=[
    "--HistoryManager.enabled=False", "--IPKernelApp.exec_lines=import vmcell_guest.lean_flush as _l; _l.install()"])
try:
    _samples = []
    for _i in range(3 + {runs}):
        _t = time.perf_counter()
        _kc.execute_interactive("1+1", output_hook=lambda msg: None, timeout=60)
        _samples.append((time.perf_counter() - _t) * 1000)
    print(json.dumps(_samples[3:]))
finally:
    _kc.stop_channels()
    _km.shutdown_kernel(now=True)
"""


async def bench_exec(runs: int, template: str = DEFAULT_TEMPLATE, progress=None) -> dict:
    """Host-timed cells on one warm session; guest time (kernel busy -> idle) reported apart, so
    the difference is what the host, the link and the agent add. The PNG cell also runs on a native
    ipykernel with the guest's package versions (bench_native.py), interleaved in the same run, and
    every cell's CPU-seconds (this process, which is the server here, plus the VM's QEMU; the native
    kernel's own process for the native column) are read from /proc around it."""
    python = await asyncio.to_thread(ensure_native_env, progress)
    async with SessionManager() as manager, native_kernel(python) as native:
        session = await manager.create(template)
        measured = [os.getpid(), session.vm.pid]
        for _ in range(3):  # the first cells after a restore retranslate guest code under TCG
            await session.execute(SIMPLE_CELL)
            await session.execute(PNG_CELL)
            await native.execute_ms(PNG_CELL)  # and the native kernel builds matplotlib's font cache
        simple, png, png_native, guest, overhead = [], [], [], [], []
        cpu = {"simple": [], "png": [], "png_native": []}
        for i in range(runs):
            before = _cpu_seconds(measured)
            r = await session.execute(SIMPLE_CELL)
            cpu["simple"].append(_cpu_seconds(measured) - before)
            if r.error or r.text != "2":
                raise RuntimeError(f"benchmark cell failed: {r.error}")
            simple.append(r.duration_ms)
            if r.guest_ms is not None:
                guest.append(r.guest_ms)
                overhead.append(r.duration_ms - r.guest_ms)
            before = _cpu_seconds(measured)
            p = await session.execute(PNG_CELL)
            cpu["png"].append(_cpu_seconds(measured) - before)
            if p.error or not any(x.png for x in p.results):
                raise RuntimeError(f"benchmark PNG cell failed: {p.error}")
            png.append(p.duration_ms)
            before = _cpu_seconds([native.cpu_pid()])
            elapsed, outputs = await native.execute_ms(PNG_CELL)
            cpu["png_native"].append(_cpu_seconds([native.cpu_pid()]) - before)
            if not any("image/png" in (o.get("content", {}).get("data") or {}) for o in outputs):
                raise RuntimeError("the native PNG cell displayed no PNG")
            png_native.append(elapsed)
            if progress:
                progress(f"run {i + 1}/{runs}: 1+1 {simple[-1]:.1f} ms, png {png[-1]:.1f} ms, "
                         f"native png {png_native[-1]:.1f} ms")
        direct = await session.execute(IN_GUEST_DIRECT_CELL.format(runs=runs), timeout=600)
        if direct.error or not direct.logs.stdout:
            raise RuntimeError(f"in-guest benchmark failed: {direct.error}")
        in_guest = json.loads("".join(direct.logs.stdout))
        restart = []
        for i in range(max(3, runs // 4)):  # restart -> the new kernel answers a cell (fewer: each is ~1 s)
            start = time.perf_counter()
            await session.restart()
            r = await session.execute(SIMPLE_CELL)
            if r.error or r.text != "2":
                raise RuntimeError(f"cell after a restart failed: {r.error}")
            restart.append((time.perf_counter() - start) * 1000)
            if progress:
                progress(f"restart {i + 1}: {restart[-1]:.0f} ms")
        accel = session.template.accel.name
    pick = lambda stats: {k: stats[k] for k in ("p50", "p95")}  # noqa: E731
    png_p50, native_p50 = Stats(png).summary()["p50"], Stats(png_native).summary()["p50"]
    return {
        "accel": accel,
        "runs": runs,
        "simple_ms": pick(Stats(simple).summary()),
        "png_ms": pick(Stats(png).summary()),
        "png_native_ms": pick(Stats(png_native).summary()),
        "png_vs_native_p50": round(png_p50 / native_p50, 2) if native_p50 else None,
        "cpu_s_per_cell": {kind: round(sum(values) / len(values), 4) for kind, values in cpu.items()},
        "guest_simple_ms": pick(Stats(guest).summary()) if guest else None,
        "outside_busy_idle_ms": {"p50": Stats(overhead).summary()["p50"]} if overhead else None,
        "in_guest_direct_ms": pick(Stats(in_guest).summary()),
        "restart_ms": pick(Stats(restart).summary()),
    }


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all threads), from /proc: steadier than wall time here."""
    from .bench_lifecycle import cpu_seconds

    return sum(cpu_seconds(pid) for pid in pids)
