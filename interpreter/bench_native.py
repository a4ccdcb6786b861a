"""A native ipykernel with the guest's package versions: the baseline a cell's cost is compared to.

`vmcell bench exec` runs the same cells on it, interleaved with the VM's, in the same run. Its
environment is a venv under $VMCELL_HOME/bench/ with exactly the guest's wheel lock installed
(kernel-images/guest-requirements.lock, the host's Python of the same minor version), built once
and cached by a hash of the lock, so "native" differs from the guest in the VM only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import venv
from contextlib import asynccontextmanager
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from .config import vmcell_home
from .errors import VmcellError
from .images.recipe import load_recipe

NATIVE_KERNEL_NAME = "vmcell-native-bench"
START_TIMEOUT_S = 120.0


class NativeBaselineError(VmcellError):
    pass


def native_env_dir(lock: Path) -> Path:
    key = hashlib.sha256(lock.read_bytes() + sys.version.encode()).hexdigest()[:16]
    return vmcell_home() / "bench" / f"native-{key}"


def ensure_native_env(progress=None) -> Path:
    """The venv's python, built the first time (pip installs the guest's lock, wheels only)."""
    recipe = load_recipe()
    guest_minor = recipe.rootfs.python_version
    host_minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    if guest_minor != host_minor:
        raise NativeBaselineError(f"the guest runs Python {guest_minor}, this host {host_minor}: no like-for-like "
                                  "native baseline")
    lock = recipe.rootfs.wheels_lock
    env = native_env_dir(lock)
    python = env / "bin" / "python"
    if (env / ".complete").exists():
        return python
    if progress:
        progress(f"building the native baseline venv ({env}) from {lock.name}")
    staging = env.with_name(env.name + ".partial")
    subprocess.run(["rm", "-rf", str(staging)], check=True)
    venv.EnvBuilder(with_pip=True).create(staging)
    done = subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", "--only-binary=:all:", "--no-deps", "-r", str(lock)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise NativeBaselineError(f"installing {lock.name} into the native venv failed: {done.stderr[-1500:]}")
    (staging / ".complete").touch()
    subprocess.run(["rm", "-rf", str(env)], check=True)
    staging.rename(env)
    # A venv's scripts name its path: the rename leaves them stale, but the kernel runs `python -m`.
    return python


class NativeKernel:
    """One ipykernel started from the native venv, with a client on it."""

    def __init__(self, manager: AsyncKernelManager):
        self.manager = manager
        self.client = manager.client()

    async def execute_ms(self, code: str, timeout: float = 120.0) -> tuple[float, list[dict]]:
        """Request sent -> the kernel idle again; with the iopub outputs of the cell."""
        outputs: list[dict] = []
        start = time.perf_counter()
        reply = await self.client.execute_interactive(code, output_hook=outputs.append, timeout=timeout)
        elapsed = (time.perf_counter() - start) * 1000
        if reply["content"]["status"] != "ok":
            raise NativeBaselineError(f"native cell failed: {reply['content'].get('evalue')}")
        return elapsed, outputs

    def cpu_pid(self) -> int:
        return self.manager.provisioner.process.pid


@asynccontextmanager
async def native_kernel(python: Path):
    with tempfile.TemporaryDirectory(prefix="vmcell-native-") as tmp:
        spec_dir = Path(tmp) / NATIVE_KERNEL_NAME
        spec_dir.mkdir()
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "native baseline", "language": "python"}))
        manager = AsyncKernelManager(kernel_name=NATIVE_KERNEL_NAME,
                                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[tmp]))
        await manager.start_kernel()
        kernel = NativeKernel(manager)
        try:
            kernel.client.start_channels()
            await asyncio.wait_for(kernel.client.wait_for_ready(timeout=START_TIMEOUT_S), START_TIMEOUT_S + 5)
            yield kernel
        finally:
            kernel.client.stop_channels()
            await manager.shutdown_kernel(now=True)
