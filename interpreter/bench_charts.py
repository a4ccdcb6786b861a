"""What chart extraction costs: a plot cell's p50 with and without the guest's chart formatter, and
the extraction alone timed inside the guest. One warm session, alternating runs (the machine's
noise hits both alike). Run: `python -m interpreter.bench_charts [runs]`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from .bench import percentile
from .config import DEFAULT_TEMPLATE
from .sessions import SessionManager
from .vm.accel import host_accelerator

PLOT = """
import numpy as np, matplotlib.pyplot as plt
x = np.linspace(0, 10, 200)
plt.figure(); plt.plot(x, np.sin(x), label='sin'); plt.plot(x, np.cos(x), label='cos')
plt.xlabel('t (s)'); plt.title('bench'); plt.show()
"""
TOGGLE = """
_f = get_ipython().display_formatter.formatters
_vmcell_chart = _f.pop('application/vnd.vmcell.chart+json', None) or globals().get('_vmcell_chart')
if {on}: _f['application/vnd.vmcell.chart+json'] = _vmcell_chart
"""
EXTRACT_ONLY = """
import time, matplotlib.pyplot as plt, numpy as np
from vmcell_guest.charts import figure_to_chart
_fig = plt.figure(); _x = np.linspace(0, 10, 200); plt.plot(_x, np.sin(_x)); plt.plot(_x, np.cos(_x))
_t = time.perf_counter(); figure_to_chart(_fig); _ms = (time.perf_counter() - _t) * 1000
plt.close(_fig); _ms
"""


async def bench_charts(runs: int = 20, template: str = DEFAULT_TEMPLATE) -> dict:
    with_chart, without, extract = [], [], []
    async with SessionManager() as manager:
        session = await manager.create(template)
        try:
            for i in range(runs + 2):  # two warm-up rounds, not counted
                for on, samples in ((True, with_chart), (False, without)):
                    await session.execute(TOGGLE.format(on=on))
                    start = time.perf_counter()
                    result = await session.execute(PLOT)
                    elapsed = (time.perf_counter() - start) * 1000
                    assert result.error is None and (result.results[0].chart is not None) == on, result.error
                    if i >= 2:
                        samples.append(elapsed)
                ms = await session.execute(EXTRACT_ONLY)
                if i >= 2:
                    extract.append(float(ms.text))
        finally:
            await manager.close(session.id)
    summary = lambda s: {"p50": round(percentile(s, 50), 1), "p95": round(percentile(s, 95), 1)}  # noqa: E731
    return {"accel": host_accelerator().name, "runs": runs, "plot_cell_with_chart_ms": summary(with_chart),
            "plot_cell_without_chart_ms": summary(without), "extraction_in_guest_ms": summary(extract)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(bench_charts(int(sys.argv[1]) if len(sys.argv) > 1 else 20)), indent=2))
