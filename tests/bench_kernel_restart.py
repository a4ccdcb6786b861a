"""Kernel restart figures: kernel_start -> first kernel_info_reply, the exec path (a fresh
`python -m ipykernel_launcher`) against the fork server, interleaved in one restored session, and
the first cells after each kind of restart beside the snapshot's warm kernel.

    VMCELL_HOME=... .venv/bin/python tests/bench_kernel_restart.py [N]   (a built template needed)

Not a test (pytest does not collect it): wall times here depend on the host's load, so compare
the two paths within one run; the QEMU CPU seconds per restart are steadier."""
import asyncio, json, os, statistics, sys, time
from interpreter.sessions import SessionManager
from vmcell_guest.ops import Op
from vmcell_guest.wire import Channel

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
FIRSTS = {
    "plot": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
    "pandas": "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3.5, 4.5]})",
    "error": "1/0",
    "pil": "from PIL import Image\nImage.new('RGB', (64, 64), 'red')",
}

def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

async def timed(s, code):
    t = time.perf_counter(); r = await s.execute(code, timeout=120)
    assert r.error is None or code == "1/0", r.error
    return (time.perf_counter() - t) * 1000

async def restart(s, mode):
    # The op by hand (not session.restart()), to pick the exec or the fork path.
    t0 = time.perf_counter(); c0 = cpu(s.vm.pid)
    r = await s.kernel.agent.call(Op.kernel_start, {"key": s.kernel.lifecycle.key.decode(), "env": {}, "mode": mode},
                                  timeout=120)
    t1 = time.perf_counter()
    await s.kernel.router.request(Channel.SHELL, "kernel_info_request", {}, timeout=120)
    t2 = time.perf_counter(); c1 = cpu(s.vm.pid)
    return {"mode": r["mode"], "op_ms": (t1 - t0) * 1000, "ready_ms": (t2 - t0) * 1000, "cpu_s": c1 - c0,
            "kill_ms": r["kill_ms"], "spawn_ms": r["spawn_ms"]}

def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]

async def main():
    print("load average", open("/proc/loadavg").read().split()[:3])
    async with SessionManager() as m:
        s = await m.create()
        await timed(s, "1 + 1")  # the first cell after a restore pays for its own things (reseed, page-ins)
        warm = {name: [await timed(s, code), await timed(s, code)] for name, code in FIRSTS.items()}
        print("snapshot's warm kernel (first, second) ms:", {k: [round(x) for x in v] for k, v in warm.items()})
        rows = []
        for i in range(N):
            for mode in (("exec", "fork") if i % 2 == 0 else ("fork", "exec")):
                row = await restart(s, mode)
                assert row["mode"] == mode, row
                if i < 3:
                    for name, code in FIRSTS.items():
                        row[name] = [await timed(s, code), await timed(s, code)]
                rows.append(row)
                print(json.dumps({k: (round(v) if isinstance(v, float) and k != "cpu_s" else [round(x) for x in v] if isinstance(v, list) else round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}))
        host = []
        for _ in range(5):
            t = time.perf_counter(); await s.restart(); host.append((time.perf_counter() - t) * 1000)
        print("load average", open("/proc/loadavg").read().split()[:3])
        for mode in ("exec", "fork"):
            sel = [r for r in rows if r["mode"] == mode]
            ready = [r["ready_ms"] for r in sel]
            firsts = {name: round(statistics.median(r[name][0] for r in sel if name in r)) for name in FIRSTS}
            seconds = {name: round(statistics.median(r[name][1] for r in sel if name in r)) for name in FIRSTS}
            print(f"{mode}: kernel_start->kernel_info_reply p50 {statistics.median(ready):.0f} ms p95 {pct(ready, 0.95):.0f} ms "
                  f"(n={len(ready)}); op p50 {statistics.median(r['op_ms'] for r in sel):.0f} ms; "
                  f"QEMU CPU p50 {statistics.median(r['cpu_s'] for r in sel):.2f} s; first cells after restart p50 {firsts}; second {seconds}")
        print(f"session.restart() (host path: kernel_start + wait_ready), fork: p50 {statistics.median(host):.0f} ms, all {[round(h) for h in host]}")

asyncio.run(main())
