"""`vmcell bench containment`: what the jail costs, and what a noisy neighbour costs a quiet session.

  restore    request-to-first-answer of a restored session, jailed and unjailed, interleaved one to
             one in the same run (so the host's drift hits both alike)
  neighbour  a quiet session's `1+1`, in rounds: alone, then beside a session whose vCPUs are all
             pinned at 100 % (busy loops in its guest), then alone again; p50 of each and the ratio
"""

from __future__ import annotations

import time

from .bench import Stats
from .config import DEFAULT_TEMPLATE
from .sessions import SessionManager
from .vm import QemuBackend

_BUSY = ("import subprocess, os\n"
         "_busy = [subprocess.Popen(['python3', '-c', 'while True: pass']) for _ in range(os.cpu_count())]\n")
_CALM = "for p in _busy: p.kill()\nfor p in _busy: p.wait()\n"


async def _cell_ms(session, code: str = "1+1") -> float:
    start = time.perf_counter()
    result = await session.execute(code)
    if result.error is not None or result.text != "2":
        raise RuntimeError(f"unexpected answer to {code!r}: {result.text!r} {result.error!r}")
    return (time.perf_counter() - start) * 1000


async def bench_containment(runs: int = 10, cells: int = 20, rounds: int = 3, template: str = DEFAULT_TEMPLATE,
                            progress=None) -> dict:
    note = progress or (lambda _: None)
    jailed_backend, plain_backend = QemuBackend(), QemuBackend(jailer=None)
    jailed: list[float] = []
    plain: list[float] = []
    async with SessionManager(jailed_backend) as jailed_manager, SessionManager(plain_backend) as plain_manager:
        built = await jailed_manager.catalog.get(template)
        if not (await jailed_backend.jailer()):
            raise RuntimeError(f"no jail on this host: {jailed_backend.confinement.jail_reason}")
        for i in range(runs + 1):  # the first pair warms both (the jail's sealed RAM copy is made once)
            for manager, samples in ((jailed_manager, jailed), (plain_manager, plain)):
                session = await manager.create(template)
                if i:
                    samples.append(session.restore_ms)
                await session.close()
            note(f"restore {i}/{runs}")
        quiet = await jailed_manager.create(template)
        noisy = await jailed_manager.create(template)
        alone: list[float] = []
        beside: list[float] = []
        for r in range(rounds):
            alone += [await _cell_ms(quiet) for _ in range(cells)]
            await noisy.execute(_BUSY)
            beside += [await _cell_ms(quiet) for _ in range(cells)]
            await noisy.execute(_CALM)
            note(f"neighbour round {r + 1}/{rounds}")
        alone += [await _cell_ms(quiet) for _ in range(cells)]
        await quiet.close()
        await noisy.close()
    alone_s, beside_s = Stats(alone).summary(), Stats(beside).summary()
    return {
        "accel": built.accel.name,
        "restore_jailed_ms": Stats(jailed).summary(),
        "restore_unjailed_ms": Stats(plain).summary(),
        "quiet_alone_ms": alone_s,
        "quiet_beside_busy_ms": beside_s,
        "neighbour_ratio_p50": round(beside_s["p50"] / alone_s["p50"], 2),
        "confinement": jailed_backend.confinement.as_dict(),
    }
