"""Which accelerator QEMU gets. KVM only where it really works; TCG otherwise, and we say so.

On PVM hosts (kvm_pvm) /dev/kvm opens but a stock guest kernel hangs: hardware virtualisation must
show in /proc/cpuinfo as vmx or svm as well.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache

from ..config import GUEST_KERNEL_HZ, TCG_APIC_BUS_HZ, TCG_TB_SIZE_MIB
from .clock import host_tsc_khz

log = logging.getLogger("vmcell.vm")


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" or "tcg"
    reason: str

    @property
    def machine_args(self) -> list[str]:
        """What shapes the guest (and so its snapshots): part of a template's key."""
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # numpy's wheels need x86-64-v2 (SSE4.2, POPCNT); `max` has it. (An AVX-less Nehalem-v2 was
        # not faster in a quick comparison, within this host's large run-to-run noise.)
        # Multi-threaded TCG uses every vCPU.
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]

    @property
    def qemu_args(self) -> list[str]:
        """machine_args plus host-side sizing that no snapshot records (changing it needs no template
        rebuild): under TCG, the translation cache (config.TCG_TB_SIZE_MIB, the bulk of an idle VM's
        own memory at QEMU's default size)."""
        if self.name == "kvm":
            return self.machine_args
        return ["-accel", f"tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}", "-cpu", "max"]

    @property
    def microvm_options(self) -> tuple[str, ...]:
        """Options of `-M microvm` (they shape the guest: part of a template's key). Under TCG, no i8254
        PIT: the guest's clock events are its local APIC's, and a PIT left running (as the firmware
        leaves it) is a QEMU timer firing 36 times a second in the main loop for nothing, half of an
        idle VM's host CPU (docs/performance.md). Under KVM the guest has the TSC deadline timer and
        the PIT is KVM's own; left as QEMU chooses."""
        return ("pit=off",) if self.name == "tcg" else ()

    def guest_kernel_args(self) -> tuple[str, ...]:
        """Kernel arguments this accelerator's guests need to keep time. Under TCG: the host TSC
        frequency (see clock.py), and loops-per-jiffy to match; tsc=reliable because with 2+ vCPUs
        the kernel otherwise marks the TSC unstable and falls back to jiffies (4 ms resolution, no
        high-resolution timers: microvm has no HPET or ACPI PM timer); lapic_timer_period because
        without a PIT (microvm_options) the kernel has nothing to calibrate its APIC timer against.
        Under KVM, kvm-clock does it. Measures the TSC the first time (0.2 s): call it off the event
        loop."""
        if self.name == "kvm":
            return ()
        khz = host_tsc_khz()
        return (f"tsc_early_khz={khz}", f"lpj={khz * 1000 // GUEST_KERNEL_HZ}", "tsc=reliable",
                f"lapic_timer_period={TCG_APIC_BUS_HZ // GUEST_KERNEL_HZ}")


def detect_accelerator(cpuinfo: str = "/proc/cpuinfo", kvm_device: str = "/dev/kvm",
                       override: str | None = None) -> Accelerator:
    override = (override if override is not None else os.environ.get("VMCELL_ACCEL", "")).strip().lower()
    if override == "tcg":
        return Accelerator("tcg", "forced by VMCELL_ACCEL=tcg")
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        flags = set()
    has_vt = bool(flags & {"vmx", "svm"})
    try:
        os.close(os.open(kvm_device, os.O_RDWR))
        kvm_opens = True
    except OSError:
        kvm_opens = False
    if has_vt and kvm_opens:
        return Accelerator("kvm", "vmx/svm in cpuinfo and /dev/kvm opens")
    why = "no vmx/svm in /proc/cpuinfo" if not has_vt else f"{kvm_device} does not open"
    if override == "kvm":
        why += " (VMCELL_ACCEL=kvm ignored: KVM would not work here)"
    if kvm_opens and not has_vt:
        why += f"; {kvm_device} exists but is paravirtual (e.g. PVM), where stock guests hang"
    return Accelerator("tcg", why)


@lru_cache(maxsize=1)
def host_accelerator() -> Accelerator:
    accel = detect_accelerator()
    log.info("accelerator: %s (%s)", accel.name.upper(), accel.reason)
    return accel
