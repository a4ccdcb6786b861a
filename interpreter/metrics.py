"""Prometheus metrics of one server: what `GET /metrics` serves.

Every metric vmcell exports is defined here, on a registry of the SessionManager's own (never
prometheus_client's global one: tests run several managers in one process, and two servers in one
process must not add up). The rest of the code calls small hooks:

  manager._restore  -> restored(seconds)          vmcell_restore_seconds
  manager.create    -> created(source)            vmcell_sessions_created_total{source}
  manager.fork      -> forked(seconds)            vmcell_fork_seconds
  manager._remember -> ended(session)             vmcell_sessions_ended_total{state}; retires its QEMU's CPU
  CellEngine        -> cell_ended(cell)           vmcell_cells_total{outcome,door}, vmcell_cell_duration_seconds
  EgressProxy       -> egress_refused(rule)       vmcell_egress_refusals_total{rule}

Gauges are computed at scrape time by a collector that looks at the manager: sessions by state,
the warm pool, guest RAM held, QEMU processes with their CPU seconds and resident memory. Every
label has a small fixed set of values (states, outcomes, doors, refusal rules, template names of
the pool): nothing is labelled per session, so the series count stays bounded however many
sessions come and go. Scrapes read /proc/PID/stat and /proc/PID/status of the QEMU processes: small
procfs reads (no disk), a few per VM, done on the loop.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .kernel.engine import Cell
    from .sessions import SessionManager

log = logging.getLogger("vmcell.metrics")
# No `*_created` gauge beside every counter and histogram (prometheus_client's default; a process-wide
# switch): Prometheus does not need them, and they double the series of every scrape.
disable_created_metrics()

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "CELL_OUTCOMES", "cell_outcome"]

# How a cell ended: `fault` = it did not end by itself (its kernel died, its session went away, the
# guest broke the protocol); `memory_limit` = interrupted at the kernel's memory high-water mark.
CELL_OUTCOMES = ("ok", "error", "timeout", "memory_limit", "fault")
SESSION_STATES = ("running", "paused", "saved")
CELL_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))
RESTORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, float("inf"))
FORK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, float("inf"))
_MIB = 1024 * 1024
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def cell_outcome(cell: "Cell") -> str:
    """One of CELL_OUTCOMES for a cell that ended."""
    error = cell.result.error
    if cell.fault is not None or (error is not None and error.fault):
        return "fault"
    if cell.timed_out:
        return "timeout"
    if error is None:
        return "ok"
    return "memory_limit" if error.name == "MemoryLimitExceeded" else "error"


def read_proc_stat(pid: int) -> tuple[int, float] | None:
    """(start time in ticks, utime+stime in seconds) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()  # after the command name, which may hold spaces
    try:  # fields from `state` on: utime and stime are 14 and 15 of stat(5), starttime 22
        return int(fields[19]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def read_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


class Metrics:
    """The metrics of one SessionManager, on its own registry."""

    def __init__(self, manager: "SessionManager"):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.restore_seconds = Histogram(
            "vmcell_restore_seconds", "Snapshot restore of a VM until its guest answered (template, fork child, "
            "pool refill)", buckets=RESTORE_BUCKETS, registry=r)
        self.fork_seconds = Histogram(
            "vmcell_fork_seconds", "A whole fork request: capture of the parent and restore of every child",
            buckets=FORK_BUCKETS, registry=r)
        self.cell_seconds = Histogram(
            "vmcell_cell_duration_seconds", "Cells from request sent to the kernel to their end (host clock)",
            buckets=CELL_BUCKETS, registry=r)
        self.cells = Counter("vmcell_cells", "Cells that ended, by outcome and door (api: REST, SDK, MCP; "
                             "gateway: Jupyter websockets)", ["outcome", "door"], registry=r)
        self.created = Counter("vmcell_sessions_created", "Sessions handed out, by where their VM came from",
                               ["source"], registry=r)
        self.ended = Counter("vmcell_sessions_ended", "Sessions that ended: closed (a client, a timeout, the "
                             "server stopping) or dead (their VM or guest failed)", ["state"], registry=r)
        self.egress_refusals = Counter("vmcell_egress_refusals", "Guest requests the egress proxy refused, by rule",
                                       ["rule"], registry=r)
        for outcome in CELL_OUTCOMES:  # every series exists from the start: rate() needs no first event
            for door in ("api", "gateway"):
                self.cells.labels(outcome, door)
        for source in ("template", "pool", "fork"):
            self.created.labels(source)
        for state in ("closed", "dead"):
            self.ended.labels(state)
        self._live = _LiveCollector(manager)
        r.register(self._live)

    # ---- hooks --------------------------------------------------------------------------------

    def restored(self, seconds: float) -> None:
        self.restore_seconds.observe(seconds)

    def created_from(self, source: str, count: int = 1) -> None:
        self.created.labels(source).inc(count)

    def forked(self, seconds: float) -> None:
        self.fork_seconds.observe(seconds)

    def ended_session(self, session) -> None:
        self.ended.labels("dead" if session.state.value == "dead" else "closed").inc()

    def cell_ended(self, cell: "Cell") -> None:
        if cell.door == "api" and cell.silent:
            return  # the host's own cell (the pool's warm-up), not a user's
        self.cells.labels(cell_outcome(cell), cell.door if cell.door in ("api", "gateway") else "api").inc()
        if cell.sent_at is not None:
            self.cell_seconds.observe(cell.result.duration_ms / 1000)

    def egress_refused(self, rule: str) -> None:
        self.egress_refusals.labels(rule).inc()

    # ---- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Gauges read from the manager at scrape time, and the QEMU CPU counter.

    QEMU CPU seconds come from /proc/PID/stat of the VMs alive now; a VM that went away keeps its
    last seen figure in `retired`, so the counter never goes down (CPU a VM used between the last
    scrape and its exit is not counted)."""

    def __init__(self, manager: "SessionManager"):
        self._manager = manager
        self._seen: dict[tuple[int, int], float] = {}  # (pid, start ticks) -> CPU seconds last read
        self._retired = 0.0

    def describe(self):
        return []  # families are built per scrape; nothing to check at registration

    def _vms(self) -> list:
        manager = self._manager
        sessions = manager.list() + manager.pool.sessions()
        return [s.vm for s in sessions if s.vm is not None and s.vm.running()]

    def collect(self):
        manager = self._manager
        sessions = manager.list()
        by_state = dict.fromkeys(SESSION_STATES, 0)
        for session in sessions:
            if session.state.value in by_state:
                by_state[session.state.value] += 1
        family = GaugeMetricFamily("vmcell_sessions", "Live sessions by state (paused: VM stopped in memory; "
                                   "saved: on disk)", labels=["state"])
        for state, count in by_state.items():
            family.add_metric([state], count)
        yield family
        yield GaugeMetricFamily("vmcell_sessions_max", "The configured session limit", value=manager.max_sessions)

        ready = GaugeMetricFamily("vmcell_pool_ready_sessions", "Warm-pool sessions restored and ready, per template",
                                  labels=["template"])
        target = GaugeMetricFamily("vmcell_pool_target_sessions", "Warm-pool size asked for, per template",
                                   labels=["template"])
        for name, size in manager.pool.sizes.items():
            ready.add_metric([name], manager.pool.ready(name))
            target.add_metric([name], size)
        yield ready
        yield target

        in_memory = [s for s in sessions + manager.pool.sessions()
                     if s.vm is not None and s.state.value in ("running", "paused")]
        yield GaugeMetricFamily(
            "vmcell_guest_memory_bytes", "Guest RAM configured for the VMs held in memory (sessions running or "
            "paused, and the pool)", value=sum(s.template.spec.memory_mib for s in in_memory) * _MIB)

        vms = self._vms()
        live: dict[tuple[int, int], float] = {}
        rss = 0
        for vm in vms:
            stat = read_proc_stat(vm.pid)
            if stat is not None:
                live[(vm.pid, stat[0])] = stat[1]
                rss += read_rss_bytes(vm.pid)
        for key, seconds in self._seen.items():
            if key not in live:
                self._retired += seconds
        self._seen = live
        yield GaugeMetricFamily("vmcell_qemu_processes", "QEMU processes of this server's VMs", value=len(live))
        yield GaugeMetricFamily("vmcell_qemu_resident_memory_bytes", "Resident memory of those QEMU processes "
                                "(guest RAM touched, shared snapshot pages included, plus QEMU's own)", value=rss)
        yield CounterMetricFamily("vmcell_qemu_cpu_seconds", "CPU time (user + system) of this server's QEMU "
                                  "processes, exited ones included", value=self._retired + sum(live.values()))
