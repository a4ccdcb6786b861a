"""`vmcell bench load`: throughput as sessions grow, and what a cell costs in CPU-seconds.

One run, two phases against one `vmcell serve --ephemeral` subprocess on loopback, driven over REST
(as tool loops drive it):

  1. one session runs `cells` rounds of the mix (a trivial cell, a pandas cell, a small plot);
  2. `sessions` sessions are created at once (create latency under load), then each runs the same
     rounds, all at the same time.

Each phase reports its aggregate cells/s (cells over the phase's wall time), cell p50/p95 and
CPU-seconds per cell: utime + stime of the server and of the phase's QEMU processes, read from
/proc before and after, which is far steadier on a shared machine than wall time.
`scaling_ratio` = aggregate(N) / aggregate(1). Every answer is checked against what its cell
must print: a cell that got no answer is `lost`, one that answered wrongly is `garbled`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .bench import Stats
from .bench_api import BenchError, free_port, running_server
from .bench_lifecycle import cpu_seconds
from .config import DEFAULT_TEMPLATE

PROC = Path("/proc")
CELL_TIMEOUT_S = 300.0
CREATE_TIMEOUT_S = 600.0
WARMUP_ROUNDS = 1  # the first cells after a restore retranslate guest code under TCG: not counted
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Cell:
    """One cell of the mix and what its answer must be: the main result's text, stdout, a PNG."""

    kind: str
    code: str
    text: str | None = None
    stdout: str | None = None
    png: bool = False


def cell_mix(session_no: int, round_no: int) -> list[Cell]:
    """Answers differ per session and round, so one session's answer in another's reply is caught:
    unique by construction (the pandas sum's n is a pairing of the two numbers; rounds < 1000)."""
    a = 1000 + session_no
    n = 10 + (session_no + round_no) * (session_no + round_no + 1) // 2 + round_no
    marker = f"plot-{session_no}-{round_no}"
    return [
        Cell("trivial", f"{a} * 1000 + {round_no}", text=str(a * 1000 + round_no)),
        Cell("pandas", f"import pandas as pd; int(pd.DataFrame({{'v': range({n})}})['v'].sum())",
             text=str(n * (n - 1) // 2)),
        Cell("plot", "import matplotlib.pyplot as plt\n"
                     f"plt.figure(figsize=(3, 2)); plt.plot([1, 3, 2]); plt.title({marker!r}); plt.show()\n"
                     f"print({marker!r})",
             stdout=marker + "\n", png=True),
    ]


def check_answer(cell: Cell, result: dict) -> str | None:
    """What is wrong with a cell's JSON ExecutionResult, or None."""
    if result.get("error"):
        error = result["error"]
        return f"error {error.get('name')}: {str(error.get('value'))[:200]}"
    if cell.text is not None:
        main = [r.get("text") for r in result.get("results", []) if r.get("is_main_result")]
        if main != [cell.text]:
            return f"main result {main!r}, expected {cell.text!r}"
    if cell.stdout is not None and "".join(result.get("logs", {}).get("stdout", [])) != cell.stdout:
        return f"stdout {result.get('logs', {}).get('stdout')!r}, expected {cell.stdout!r}"
    if cell.png:
        pngs = [r["png"] for r in result.get("results", []) if r.get("png")]
        try:
            if len(pngs) != 1 or not base64.b64decode(pngs[0], validate=True).startswith(PNG_MAGIC):
                return f"{len(pngs)} PNG results, expected one PNG"
        except ValueError:
            return "a PNG result that is not base64"
    return None


def qemu_children(server_pid: int) -> list[int]:
    """The QEMU processes a server started (an ephemeral server's VMs are its children)."""
    found = []
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            stat = (PROC / entry / "stat").read_text()
            argv0 = (PROC / entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if b"qemu-system" in argv0 and int(stat[stat.rindex(")") + 2:].split()[1]) == server_pid:
            found.append(int(entry))
    return found


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError as exc:
            raise BenchError(f"process {pid} went away during a measured phase: {exc}") from None
    return total


@dataclass
class Phase:
    sessions: int
    cells: int = 0
    lost: int = 0
    garbled: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    server_cpu_s: float = 0.0  # of cpu_s: the server process (the rest is the VMs' QEMUs)
    cell_ms: list[float] = field(default_factory=list)
    by_kind_ms: dict[str, list[float]] = field(default_factory=dict)
    create_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        pick = lambda samples: {k: v for k, v in Stats(samples).summary().items() if k != "max"} \
            if samples else None  # noqa: E731
        answered = self.cells - self.lost
        return {
            "sessions": self.sessions,
            "cells": self.cells,
            "lost": self.lost,
            "garbled": self.garbled,
            "wall_s": round(self.wall_s, 2),
            "cells_per_s": round(answered / self.wall_s, 2) if self.wall_s else None,
            "cell_ms": pick(self.cell_ms),
            "cell_ms_by_kind": {kind: pick(samples) for kind, samples in self.by_kind_ms.items()},
            "cpu_s": round(self.cpu_s, 2),
            "cpu_s_per_cell": round(self.cpu_s / answered, 4) if answered else None,
            "server_cpu_s_per_cell": round(self.server_cpu_s / answered, 4) if answered else None,
            "create_ms": pick(self.create_ms),
            "problems": self.problems[:10],
        }


class LoadClient:
    def __init__(self, port: int, token: str, concurrency: int):
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
        # Tornado's client queues past max_clients (default 10): every session gets its own connection.
        self.http = AsyncHTTPClient(force_instance=True, max_clients=concurrency + 4)

    async def call(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        payload = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        request = HTTPRequest(self.base + path, method, headers=self.headers, body=payload,
                              request_timeout=timeout, connect_timeout=timeout)
        try:
            response = await self.http.fetch(request)
        except HTTPClientError as exc:
            detail = exc.response.body.decode(errors="replace")[:300] if exc.response is not None else str(exc)
            raise BenchError(f"{method} {path}: {exc.code} {detail}") from None
        return json.loads(response.body) if response.body else {}

    def close(self) -> None:
        self.http.close()


async def _create(client: LoadClient, template: str, phase: Phase) -> str:
    start = time.perf_counter()
    info = await client.call("POST", "/sessions", {"template": template}, CREATE_TIMEOUT_S)
    phase.create_ms.append((time.perf_counter() - start) * 1000)
    return info["id"]


async def _run_rounds(client: LoadClient, sid: str, session_no: int, rounds: int, phase: Phase | None) -> None:
    """`rounds` rounds of the mix on one session; counted in `phase` (None: a warm-up, checked only)."""
    for round_no in range(rounds):
        for cell in cell_mix(session_no, round_no):
            start = time.perf_counter()
            try:
                result = await client.call("POST", f"/sessions/{sid}/execute",
                                           {"code": cell.code, "timeout": CELL_TIMEOUT_S}, CELL_TIMEOUT_S + 30)
            except (BenchError, OSError, asyncio.TimeoutError) as exc:
                if phase is None:
                    raise BenchError(f"warm-up cell on {sid} got no answer: {exc}") from None
                phase.cells += 1
                phase.lost += 1
                phase.problems.append(f"{sid} {cell.kind}: no answer: {exc}")
                continue
            elapsed = (time.perf_counter() - start) * 1000
            wrong = check_answer(cell, result)
            if phase is None:
                if wrong:
                    raise BenchError(f"warm-up cell on {sid} answered wrongly: {wrong}")
                continue
            phase.cells += 1
            phase.cell_ms.append(elapsed)
            phase.by_kind_ms.setdefault(cell.kind, []).append(elapsed)
            if wrong:
                phase.garbled += 1
                phase.problems.append(f"{sid} {cell.kind}: {wrong}")


async def run_phase(client: LoadClient, server_pid: int, template: str, sessions: int, rounds: int,
                    progress=None) -> Phase:
    phase = Phase(sessions)
    ids = await asyncio.gather(*(_create(client, template, phase) for _ in range(sessions)))
    try:
        if progress:
            progress(f"{sessions} session(s) created: create p50 {Stats(phase.create_ms).summary()['p50']:.0f} ms")
        await asyncio.gather(*(_run_rounds(client, sid, n, WARMUP_ROUNDS, None) for n, sid in enumerate(ids)))
        qemus = qemu_children(server_pid)
        if len(qemus) != sessions:
            raise BenchError(f"the server runs {len(qemus)} QEMU processes for {sessions} sessions")
        server_before, qemu_before, start = _cpu([server_pid]), _cpu(qemus), time.perf_counter()
        await asyncio.gather(*(_run_rounds(client, sid, n, rounds, phase) for n, sid in enumerate(ids)))
        phase.wall_s = time.perf_counter() - start
        phase.server_cpu_s = _cpu([server_pid]) - server_before
        phase.cpu_s = phase.server_cpu_s + _cpu(qemus) - qemu_before
        if progress:
            s = phase.summary()
            progress(f"{sessions} session(s): {s['cells_per_s']} cells/s, {s['cpu_s_per_cell']} CPU-s/cell, "
                     f"lost {s['lost']}, garbled {s['garbled']}")
        return phase
    finally:
        await asyncio.gather(*(client.call("DELETE", f"/sessions/{sid}", None, 60) for sid in ids),
                             return_exceptions=True)


async def bench_load(sessions: int = 20, rounds: int = 5, template: str = DEFAULT_TEMPLATE, progress=None) -> dict:
    if sessions < 1 or rounds < 1:
        raise BenchError("--sessions and --cells must be at least 1")
    token = secrets.token_urlsafe(16)
    port = free_port()
    argv = [sys.executable, "-m", "interpreter.cli", "serve", "--no-build", "--ephemeral", "--host", "127.0.0.1",
            "--port", str(port), f"--token={token}", "--max-sessions", str(sessions + 1), "--template", template]
    with tempfile.TemporaryDirectory(prefix="vmcell-bench-load-") as tmp:
        async with running_server("vmcell serve", argv, port, token, Path(tmp) / "server.log") as server:
            client = LoadClient(port, token, sessions)
            try:
                health = await client.call("GET", "/health", None, 30)
                one = await run_phase(client, server.pid, template, 1, rounds, progress)
                many = await run_phase(client, server.pid, template, sessions, rounds, progress)
            finally:
                client.close()
    single, loaded = one.summary(), many.summary()
    ratio = (loaded["cells_per_s"] / single["cells_per_s"]) if single["cells_per_s"] and loaded["cells_per_s"] \
        else None
    return {
        "accel": health.get("accel", "unknown"),
        "template": template,
        "rounds": rounds,
        "mix": [cell.kind for cell in cell_mix(0, 0)],
        "single": single,
        "loaded": loaded,
        "scaling_ratio": round(ratio, 3) if ratio is not None else None,
        "lost": single["lost"] + loaded["lost"],
        "garbled": single["garbled"] + loaded["garbled"],
    }
