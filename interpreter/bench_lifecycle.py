"""`vmcell bench lifecycle`: what the session lifecycle costs on this machine, in-process.

Latencies (p50/p95, host-timed), each on a quiet machine (the pool is refilled before every sample,
the other sessions are suspended):

- restore_ms: `manager.create()` restoring from the template snapshot (`session.restore_ms`; measured
  before the pool starts, since a session taken from the pool reports the take as its restore);
- pool_take_ms: `manager.create()` answered from the warm pool; pool_first_cell_ms: the user's first
  cell (`1 + 1`) on it, and pool_take_to_first_cell_ms the two together;
- pause_ms / resume_ms: in memory (`session.suspend()` / `session.wake()` to the first answered ping);
- save_ms / load_ms: to disk and back (`manager.pause()` / `manager.resume()` to the first answered ping);
- fork_ms / fork8_ms: `manager.fork(id, 1)` and `manager.fork(id, 8)`.

Density: N sessions (default 50) are made, then their QEMUs' CPU use is read from /proc over a
window, all running idle and then all suspended (what auto-pause leaves them in), and their PSS
summed (/proc/<pid>/smaps_rollup). How many idle sessions fit here is the lower of the memory
available before they existed over PSS per session, and the cores over CPU per session;
"extrapolated" when that is more than were run.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from pathlib import Path

from .bench import Stats
from .config import DEFAULT_TEMPLATE
from .errors import VmcellError

PROC = Path("/proc")
POOL_SIZE = 2
FORK_MANY = 8
POOL_READY_TIMEOUT_S = 120.0
SETTLE_S = 2.0  # after waking or suspending everyone, before a CPU window starts
CHECK_CELL, CHECK_TEXT = "x + 1", "42"


class BenchError(VmcellError):
    pass


# ---- measuring processes (/proc) --------------------------------------------------------------


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of /proc/<pid>/stat. The command name (field 2)
    may hold spaces and parentheses, so fields are counted from after its last ')'."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15; fields[0] is field 3 (state)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, all its threads together."""
    return parse_stat_cpu_ticks((PROC / str(pid) / "stat").read_text()) / os.sysconf("SC_CLK_TCK")


def pss_kib(pid: int) -> int:
    """Proportional set size: private pages plus each shared page divided by how many map it."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except FileNotFoundError:  # kernels before 4.14: the same sum over every mapping
        text = (PROC / str(pid) / "smaps").read_text()
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))


def mem_available_kib() -> int:
    for line in (PROC / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise BenchError("/proc/meminfo has no MemAvailable line")


async def cpu_percent(pids: list[int], window_s: float) -> list[float]:
    """Each process's CPU use over a window, in percent of one core."""
    before = [cpu_seconds(pid) for pid in pids]
    start = time.monotonic()
    await asyncio.sleep(window_s)
    after = [cpu_seconds(pid) for pid in pids]
    elapsed = time.monotonic() - start
    return [(b - a) / elapsed * 100 for a, b in zip(before, after)]


def idle_capacity(sessions: int, pss_mib: float, cpu_pct: float, mem_available_mib: float, cores: int) -> dict:
    """How many idle sessions fit: the lower of memory (what was available before the measured ones
    existed, over PSS per session) and CPU (the cores, over CPU per session; none if it is 0)."""
    by_memory = math.floor(mem_available_mib / pss_mib) if pss_mib > 0 else None
    by_cpu = math.floor(cores * 100 / cpu_pct) if cpu_pct > 0 else None
    bounds = {name: n for name, n in (("memory", by_memory), ("cpu", by_cpu)) if n is not None}
    if not bounds:
        return {"max_idle_sessions": None, "max_idle_sessions_basis": "unknown",
                "max_idle_sessions_limited_by": None, "max_idle_sessions_by_memory": None,
                "max_idle_sessions_by_cpu": None}
    limited_by = min(bounds, key=bounds.get)
    best = bounds[limited_by]
    return {"max_idle_sessions": best,
            "max_idle_sessions_basis": "measured" if best <= sessions else f"extrapolated from {sessions}",
            "max_idle_sessions_limited_by": limited_by,
            "max_idle_sessions_by_memory": by_memory, "max_idle_sessions_by_cpu": by_cpu}


# ---- the benchmark ----------------------------------------------------------------------------


def _p(samples: list[float]) -> dict:
    stats = Stats(samples).summary()
    return {"p50": stats["p50"], "p95": stats["p95"]}


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


async def _pool_full(manager, template: str) -> None:
    """Waits until the pool holds POOL_SIZE ready sessions, so no refill competes with a sample."""
    deadline = time.monotonic() + POOL_READY_TIMEOUT_S
    while manager.pool.ready(template) < POOL_SIZE:
        if time.monotonic() > deadline:
            raise BenchError(f"the pool did not refill to {POOL_SIZE} within {POOL_READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)


async def _check(session, label: str) -> None:
    result = await session.execute(CHECK_CELL)
    if result.error or result.text != CHECK_TEXT:
        raise BenchError(f"{label}: `{CHECK_CELL}` gave {result.text!r} ({result.error}), not {CHECK_TEXT}")


async def bench_lifecycle(sessions: int = 50, template: str = DEFAULT_TEMPLATE, runs: int = 10,
                          idle_window_s: float = 10.0, progress=None) -> dict:
    from .sessions import SessionManager
    from .sessions.settings import LifecycleSettings

    with tempfile.TemporaryDirectory(prefix="vmcell-bench-lifecycle-") as state:
        settings = LifecycleSettings(pool={template: POOL_SIZE}, auto_pause_s=None, state_dir=Path(state))
        # Not `async with`: the pool starts only once the restores are timed (_measure starts it).
        manager = SessionManager(max_sessions=max(sessions, 2 * runs) + FORK_MANY + 1, lifecycle=settings)
        try:
            built = await manager.catalog.get(template)
            result = await _measure(manager, template, sessions, runs, idle_window_s, progress or (lambda _: None))
        finally:
            await manager.close_all("the benchmark is over")  # durable ones would outlive it
            await manager.shutdown("the benchmark is over")
    return {"accel": built.accel.name, "template": template, "sessions": sessions, "runs": runs,
            "cores": os.cpu_count(), "pool_size": POOL_SIZE} | result


async def _measure(manager, template: str, sessions: int, runs: int, idle_window_s: float, note) -> dict:
    population: list[str] = []  # session ids; a session is fetched again by id (resume may replace it)
    samples: dict[str, list[float]] = {k: [] for k in ("restore", "pool_take", "pool_first_cell",
                                                       "pool_take_to_first_cell", "pause", "resume", "save", "load",
                                                       "fork", "fork8")}
    mem_before_kib = mem_available_kib()

    # Restores, with no pool yet (nothing else runs); each session is suspended once made, so that
    # the sessions kept for the density figures leave the host quiet.
    for _ in range(runs):
        session = await manager.create(template)
        samples["restore"].append(session.restore_ms)
        population.append(session.id)
        await session.suspend()
    note(f"restore: {runs} samples, p50 {_p(samples['restore'])['p50']} ms")

    # Pool takes, each from a full pool.
    await manager.start()
    await _pool_full(manager, template)
    misses = 0
    for _ in range(runs):
        await _pool_full(manager, template)
        start = time.perf_counter()
        session = await manager.create(template)
        samples["pool_take"].append(_ms(start))
        misses += manager.pool.ready(template) >= POOL_SIZE  # it did not come from the pool
        first = time.perf_counter()
        if (await session.execute("1 + 1")).text != "2":
            raise BenchError(f"the first cell of pooled session {session.id} answered wrongly")
        samples["pool_first_cell"].append(_ms(first))
        samples["pool_take_to_first_cell"].append(_ms(start))
        population.append(session.id)
        await session.suspend()
    note(f"pool take: {len(samples['pool_take'])} samples, p50 {_p(samples['pool_take'])['p50']} ms")

    subject = manager.get(population[0])
    result = await subject.execute("x = 41")  # wakes it
    if result.error:
        raise BenchError(f"setting up the subject session failed: {result.error}")
    for _ in range(runs):  # in memory: QMP stop / cont (+ the guest clock set right)
        await _pool_full(manager, template)
        start = time.perf_counter()
        await subject.suspend()
        samples["pause"].append(_ms(start))
        start = time.perf_counter()
        await subject.wake()
        await subject.ping()
        samples["resume"].append(_ms(start))
    await _check(subject, "after in-memory pause and resume")
    note(f"pause/resume in memory: p50 {_p(samples['pause'])['p50']} / {_p(samples['resume'])['p50']} ms")
    for _ in range(runs):  # to disk and back
        await _pool_full(manager, template)
        start = time.perf_counter()
        await manager.pause(subject.id)
        samples["save"].append(_ms(start))
        start = time.perf_counter()
        subject = await manager.resume(subject.id)
        await subject.ping()
        samples["load"].append(_ms(start))
    await _check(subject, "after saving to disk and loading")
    note(f"save/load: p50 {_p(samples['save'])['p50']} / {_p(samples['load'])['p50']} ms")
    for count, key, rounds in ((1, "fork", runs), (FORK_MANY, "fork8", max(2, runs // 3))):
        for j in range(rounds):
            await _pool_full(manager, template)
            start = time.perf_counter()
            children = await manager.fork(subject.id, count)
            samples[key].append(_ms(start))
            try:
                if len(children) != count:
                    raise BenchError(f"fork({count}) made {len(children)} sessions")
                if j == 0:
                    await _check(children[-1], f"in a child of fork({count})")
            finally:
                for child in children:
                    await manager.close(child.id, "benchmark fork child")
        note(f"fork({count}): p50 {_p(samples[key])['p50']} ms")

    # The population: N sessions, two made at a time, each suspended once made.
    for session_id in population[sessions:]:
        await manager.close(session_id, "more sessions than the density figures want")
    del population[sessions:]
    while len(population) < sessions:
        made = await asyncio.gather(*(manager.create(template) for _ in range(min(2, sessions - len(population)))))
        for session in made:
            await session.suspend()
            population.append(session.id)
        if len(population) % 10 == 0 or len(population) == sessions:
            note(f"{len(population)}/{sessions} sessions")
    live = [manager.get(session_id) for session_id in population]

    for session in live:
        if session.state.value == "paused":
            await session.wake()
    await asyncio.sleep(SETTLE_S)
    running_cpu = await cpu_percent([s.vm.pid for s in live], idle_window_s)
    for session in live:
        if session.state.value == "running":
            await session.suspend()
    await asyncio.sleep(SETTLE_S)
    pids = [s.vm.pid for s in live]
    idle_cpu = await cpu_percent(pids, idle_window_s)
    pss_mib = sum(pss_kib(pid) for pid in pids) / 1024 / len(pids)
    cpu_per_session = sum(idle_cpu) / len(idle_cpu)
    note(f"{len(pids)} sessions: idle CPU {sum(running_cpu) / len(running_cpu):.2f} % running, "
         f"{cpu_per_session:.3f} % suspended; PSS {pss_mib:.1f} MiB each")
    return {
        "pool_take_ms": _p(samples["pool_take"]), "pool_take_misses": misses,
        "pool_first_cell_ms": _p(samples["pool_first_cell"]),
        "pool_take_to_first_cell_ms": _p(samples["pool_take_to_first_cell"]),
        "restore_ms": _p(samples["restore"]),
        "pause_ms": _p(samples["pause"]), "resume_ms": _p(samples["resume"]),
        "save_ms": _p(samples["save"]), "load_ms": _p(samples["load"]),
        "fork_ms": _p(samples["fork"]), "fork8_ms": _p(samples["fork8"]),
        "idle_window_s": idle_window_s,
        "running_idle_cpu_pct_per_session": round(sum(running_cpu) / len(running_cpu), 3),
        "idle_cpu_pct_per_session": round(cpu_per_session, 3),
        "pss_mib_per_session": round(pss_mib, 1),
        "mem_available_mib": round(mem_before_kib / 1024),
    } | idle_capacity(len(pids), pss_mib, cpu_per_session, mem_before_kib / 1024, os.cpu_count() or 1)
