"""The host TSC's frequency, which a TCG guest must be told to keep time.

Under TCG, QEMU answers the guest's RDTSC with the host's TSC, and microvm gives the guest nothing
to calibrate it against (no PIT/HPET/ACPI PM timer): the kernel then hangs calibrating, unless the
command line names the frequency. A wrong figure makes the guest clock run fast or slow by the same
ratio (2.0 GHz on this 2.445 GHz host made every guest second 0.82 s long), so it is measured here.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import re
import time
from functools import lru_cache

log = logging.getLogger("vmcell.vm")

# x86-64: rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes((0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3))
MEASURE_WINDOW_S = 0.2
# The figure is rounded: a template's snapshot (whose kernel already believes a figure) is keyed by it,
# and run-to-run measurement noise (~1 kHz) must not force a rebuild. 50 kHz in 2 GHz is 0.0025%,
# about 2 s a day, and every session's clock is set from the host's at restore anyway.
ROUND_TO_KHZ = 100


def _rdtsc_function():
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_RDTSC_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    function._page = page  # the code lives as long as the function
    return function


def _paired_reading(rdtsc) -> tuple[int, int]:
    """(ns, tsc) read as close together as this host allows: the tightest of a few brackets."""
    best = None
    for _ in range(7):
        before = time.perf_counter_ns()
        tsc = rdtsc()
        after = time.perf_counter_ns()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2, tsc)
    return best[1], best[2]


def measure_tsc_khz(window_s: float = MEASURE_WINDOW_S) -> int:
    rdtsc = _rdtsc_function()
    ns0, tsc0 = _paired_reading(rdtsc)
    time.sleep(window_s)
    ns1, tsc1 = _paired_reading(rdtsc)
    return (tsc1 - tsc0) * 1_000_000 // (ns1 - ns0)


def _cpuinfo_khz(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    try:
        with open(cpuinfo) as f:
            match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", f.read(), re.M)
    except OSError:
        return None
    return int(float(match.group(1)) * 1000) if match else None


@lru_cache(maxsize=1)
def host_tsc_khz() -> int:
    """Measured once per process (0.2 s: call it off the event loop the first time)."""
    try:
        khz = measure_tsc_khz()
        source = "measured"
    except (OSError, ValueError, ZeroDivisionError) as exc:  # e.g. a policy forbidding executable pages
        khz = _cpuinfo_khz()
        source = f"from /proc/cpuinfo ({exc!r} measuring it)"
        if khz is None:
            raise OSError("cannot tell the host TSC frequency: measuring failed and /proc/cpuinfo has no "
                          "`cpu MHz`") from exc
    khz = max(ROUND_TO_KHZ, round(khz / ROUND_TO_KHZ) * ROUND_TO_KHZ)
    log.debug("host TSC: %d kHz (%s)", khz, source)
    return khz
