"""MicroVMs: the backend interface, the QEMU microvm backend, accelerator choice, workdirs."""

from .accel import Accelerator, detect_accelerator, host_accelerator
from .backend import VM, Drive, VMBackend, VMConfig
from .qemu import QemuBackend, qemu_binary
from .workdir import Workdir, reap_stale_workdirs

__all__ = ["Accelerator", "detect_accelerator", "host_accelerator", "VM", "Drive", "VMBackend", "VMConfig",
           "QemuBackend", "qemu_binary", "Workdir", "reap_stale_workdirs"]
