"""`vmcell bench ab A B`: what a change does to a cell's cost, two checkouts against each other in one run.

On this machine wall time drifts by 1.5x within minutes, so two benchmark runs one after the other
cannot show a 10 % change. Here both sides run at once and take turns:

  1. each checkout (a directory holding vmcell's sources, e.g. a `git worktree` of an older commit)
     builds its template into its own VMCELL_HOME ($VMCELL_HOME/ab/<hash of the path>, or the usual
     one for this checkout; the image and download caches are shared: they are keyed by their
     inputs), one after the other;
  2. each gets a `vmcell serve --ephemeral` of its own, started from its directory with this
     Python, and one session on it, warmed up;
  3. `rounds` rounds, each a block of `cells` cells on A and one on B, in the order A B, B A, ...;
     a block's cost is the CPU-seconds of its server and the server's QEMU processes (/proc), over
     the block's cells.

It reports each side's CPU-s per cell (median over blocks) and cell p50/p95, and the paired
difference A - B per round (median, and in how many rounds B was cheaper): a change shows as a
difference that keeps its sign round after round, not as two medians. Every answer must match
between the sides (the cell's text or stdout), and every cell must succeed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import statistics
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

from .bench import Stats
from .bench_api import BenchError, free_port, running_server
from .bench_load import LoadClient, _cpu, qemu_children
from .config import DEFAULT_TEMPLATE, REPO_ROOT, vmcell_home

BUILD_TIMEOUT_S = 1800.0
CELL_TIMEOUT_S = 300.0
WARMUP_CELLS = 5  # the first cells after a restore retranslate guest code under TCG
SHARED_CACHES = ("images", "downloads")  # keyed by their inputs: safe to share between checkouts


def checkout_home(checkout: Path, home: Path | None = None) -> Path:
    """A checkout's own VMCELL_HOME (its templates, run dir, token), sharing the keyed caches; this
    checkout keeps the usual one (its template is likely built already)."""
    home = home or vmcell_home()
    if checkout.resolve() == REPO_ROOT:
        return home
    own = home / "ab" / hashlib.sha256(str(checkout.resolve()).encode()).hexdigest()[:12]
    own.mkdir(parents=True, exist_ok=True)
    for name in SHARED_CACHES:
        (home / name).mkdir(parents=True, exist_ok=True)
        link = own / name
        if not link.is_symlink():
            link.symlink_to(home / name)
    return own


def check_checkout(path: Path) -> Path:
    if not (path / "interpreter" / "cli.py").is_file() or not (path / "guest").is_dir():
        raise BenchError(f"{path}: not a vmcell checkout (no interpreter/cli.py and guest/ there); "
                         f"e.g. `git worktree add /tmp/vmcell-old <commit>`")
    return path.resolve()


def _env(checkout: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "VMCELL_HOME": str(home), "PYTHONPATH": str(checkout)}


async def build_template(checkout: Path, home: Path, template: str, log: Path) -> None:
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "interpreter.cli", "template", "build", template, cwd=checkout,
            env=_env(checkout, home), stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL)
    try:
        code = await asyncio.wait_for(proc.wait(), BUILD_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"building {template!r} in {checkout} took over {BUILD_TIMEOUT_S:.0f} s "
                         f"(log: {log})") from None
    if code != 0:
        raise BenchError(f"building {template!r} in {checkout} failed (status {code}); log: {log}")


def paired(a: list[float], b: list[float]) -> dict:
    """Round-by-round A - B: its median, and in how many rounds B cost less."""
    diffs = [x - y for x, y in zip(a, b)]
    return {"a_minus_b_median": round(statistics.median(diffs), 4) if diffs else None,
            "b_cheaper_in": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"}


def _answer(result: dict) -> str:
    if result.get("error"):
        error = result["error"]
        raise BenchError(f"the cell failed: {error.get('name')}: {error.get('value')}")
    texts = [r.get("text") for r in result.get("results", []) if r.get("text") is not None]
    return repr((texts, "".join(result.get("logs", {}).get("stdout", []))))  # streams arrive in any chunking


class Side:
    def __init__(self, name: str, checkout: Path, client: LoadClient, server_pid: int, session_id: str):
        self.name, self.checkout, self.client = name, checkout, client
        self.server_pid, self.sid = server_pid, session_id
        self.block_cpu: list[float] = []
        self.cell_ms: list[float] = []
        self.answer: str | None = None

    async def block(self, code: str, cells: int, measured: bool = True) -> None:
        pids = [self.server_pid, *qemu_children(self.server_pid)]
        before = _cpu(pids)
        for _ in range(cells):
            start = time.perf_counter()
            result = await self.client.call("POST", f"/sessions/{self.sid}/execute",
                                            {"code": code, "timeout": CELL_TIMEOUT_S}, CELL_TIMEOUT_S + 30)
            elapsed = (time.perf_counter() - start) * 1000
            answer = _answer(result)
            if self.answer is None:
                self.answer = answer
            elif answer != self.answer:
                raise BenchError(f"{self.name}: the cell answered {answer[:200]} after {self.answer[:200]}")
            if measured:
                self.cell_ms.append(elapsed)
        if measured:
            self.block_cpu.append((_cpu(pids) - before) / cells)

    def summary(self) -> dict:
        return {"checkout": str(self.checkout), "cpu_s_per_cell": round(statistics.median(self.block_cpu), 4),
                "cell_ms": Stats(self.cell_ms).summary()}


async def bench_ab(a: Path, b: Path, code: str = "1+1", rounds: int = 12, cells: int = 10,
                   template: str = DEFAULT_TEMPLATE, progress=None) -> dict:
    if rounds < 1 or cells < 1:
        raise BenchError("--rounds and --cells must be at least 1")
    note = progress or (lambda _: None)
    checkouts = {"a": check_checkout(a), "b": check_checkout(b)}
    homes = {k: checkout_home(path) for k, path in checkouts.items()}
    for k, path in checkouts.items():  # one after the other: the shared image cache is built once
        note(f"{k.upper()}: template {template!r} for {path} (VMCELL_HOME {homes[k]}) ...")
        await build_template(path, homes[k], template, homes[k] / "bench-ab-build.log")
    token = secrets.token_urlsafe(16)
    async with _server(checkouts["a"], homes["a"], template, token, "a") as (port_a, pid_a), \
            _server(checkouts["b"], homes["b"], template, token, "b") as (port_b, pid_b):
        sides: dict[str, Side] = {}
        clients = {"a": LoadClient(port_a, token, 1), "b": LoadClient(port_b, token, 1)}
        try:
            for k, pid in (("a", pid_a), ("b", pid_b)):
                info = await clients[k].call("POST", "/sessions", {"template": template}, CELL_TIMEOUT_S)
                sides[k] = Side(k.upper(), checkouts[k], clients[k], pid, info["id"])
            health = await clients["b"].call("GET", "/health", None, 30)
            for side in sides.values():
                await side.block(code, WARMUP_CELLS, measured=False)
            if sides["a"].answer != sides["b"].answer:
                raise BenchError(f"A answers {sides['a'].answer[:200]}, B {sides['b'].answer[:200]}")
            for round_no in range(rounds):
                for k in ("a", "b") if round_no % 2 == 0 else ("b", "a"):
                    await sides[k].block(code, cells)
                note(f"round {round_no + 1}/{rounds}: A {sides['a'].block_cpu[-1]:.4f}, "
                     f"B {sides['b'].block_cpu[-1]:.4f} CPU-s per cell")
        finally:
            for client in clients.values():
                client.close()
    return {"accel": health.get("accel", "unknown"), "template": template, "code": code, "rounds": rounds,
            "cells_per_block": cells, "a": sides["a"].summary(), "b": sides["b"].summary(),
            **paired(sides["a"].block_cpu, sides["b"].block_cpu),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


@asynccontextmanager
async def _server(checkout: Path, home: Path, template: str, token: str, side: str):
    """`vmcell serve --ephemeral` of one checkout, from its directory, with its own VMCELL_HOME: (port, pid)."""
    port = free_port()
    argv = [sys.executable, "-m", "interpreter.cli", "serve", "--no-build", "--ephemeral", "--host", "127.0.0.1",
            "--port", str(port), f"--token={token}", "--auto-pause", "0", "--template", template]
    async with running_server(f"vmcell serve ({checkout})", argv, port, token, home / f"bench-ab-serve-{side}.log",
                              cwd=checkout, env=_env(checkout, home)) as server:
        yield port, server.pid
