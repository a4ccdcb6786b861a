"""Templates: a spec in templates/NAME.toml, built into a warm, snapshotted VM under $VMCELL_HOME.

A built template is a directory keyed by a hash of everything it was made from (images, spec,
accelerator, VMM version) holding:
  rw-empty.img  the writable layer as first formatted (for cold boots)
  rw.img        the writable layer as it was at snapshot time (read-only backing of every session)
  memory.bin    the VM's RAM at snapshot time (sessions map it copy-on-write)
  state.bin     the VM's device state (CPU, virtio queues, ...)
  meta.json     what it was built from and how long each step took
The disk, the RAM and the device state are captured at the same instant (the VM is stopped, disks flushed),
which is what makes restoring them together consistent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import shutil
import time
import tomllib
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator

from .config import COLD_BOOT_TIMEOUT_S, RW_FS_LABEL, TEMPLATES_DIR, templates_cache_dir
from .errors import TemplateBuildError, TemplateMissing, VmcellError
from .images import GuestImages, ensure_images, make_ext4, planned_images
from .images.cache import atomic_output, build_lock, digest
from .kernel.client import KernelClient
from .kernel.link import GuestLink
from .progress import Progress
from .vm.accel import Accelerator, host_accelerator
from .vm.backend import VM, Drive, MemoryFile, VMBackend, VMConfig
from .vm.workdir import Workdir

log = logging.getLogger("vmcell.templates")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
WARMUP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    description: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    warmup: str
    debian_packages: tuple[str, ...] = field(default=())
    python_wheels: tuple[str, ...] = field(default=())
    # Modules the guest's kernel fork server imports before forking kernels (fast restarts).
    preload: tuple[str, ...] = field(default=())

    def validate(self) -> None:
        problems = []
        if not _NAME.match(self.name):
            problems.append("name must be 1-32 of [a-z0-9_-]")
        if not 1 <= self.vcpus <= 16:
            problems.append("vcpus must be 1..16")
        if not 256 <= self.memory_mib <= 65536:
            problems.append("memory_mib must be 256..65536")
        if not 64 <= self.disk_mib <= 1024 * 1024:
            problems.append("disk_mib must be 64..1048576")
        if problems:
            raise TemplateMissing(f"template {self.name!r} is invalid: " + "; ".join(problems))


def available_templates(directory: Path = TEMPLATES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_template(name: str, directory: Path = TEMPLATES_DIR) -> TemplateSpec:
    path = directory / f"{name}.toml"
    if not _NAME.match(name) or not path.is_file():
        known = ", ".join(available_templates(directory)) or "none"
        raise TemplateMissing(f"unknown template {name!r} (templates: {known}; specs live in {directory})")
    try:
        raw = tomllib.loads(path.read_text())
        spec = TemplateSpec(
            name=raw.get("name", name), description=raw.get("description", ""),
            vcpus=int(raw["vcpus"]), memory_mib=int(raw["memory_mib"]), disk_mib=int(raw["disk_mib"]),
            warmup=str(raw.get("warmup", "")),
            debian_packages=tuple(raw.get("debian_packages", ())), python_wheels=tuple(raw.get("python_wheels", ())),
            preload=tuple(str(m) for m in raw.get("preload", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TemplateMissing(f"template spec {path} is invalid: {exc!r}") from None
    spec.validate()
    return spec


@dataclass(frozen=True)
class BuiltTemplate:
    spec: TemplateSpec
    images: GuestImages
    accel: Accelerator
    directory: Path
    kernel_args: tuple[str, ...] = ()  # the accelerator's, after the images' command line

    @property
    def key(self) -> str:
        return self.directory.name.rsplit("-", 1)[-1]

    @property
    def state_file(self) -> Path:
        return self.directory / "state.bin"

    @property
    def rw_image(self) -> Path:
        return self.directory / "rw.img"

    @property
    def rw_empty_image(self) -> Path:
        return self.directory / "rw-empty.img"

    @property
    def meta(self) -> dict:
        return json.loads((self.directory / "meta.json").read_text())

    @property
    def kernel_key(self) -> bytes:
        return self.meta["kernel_key"].encode()

    def is_built(self) -> bool:
        return (self.directory / "meta.json").is_file()

    @property
    def memory_file(self) -> Path:
        return self.directory / "memory.bin"

    def vm_config(self, writable: Drive, memory: MemoryFile | None = None) -> VMConfig:
        """A session's VM: the base root, its own writable layer, the template's RAM copy-on-write."""
        return VMConfig(
            kernel=self.images.vmlinuz, initramfs=self.images.initramfs, cmdline=self.images.cmdline,
            vcpus=self.spec.vcpus, memory_mib=self.spec.memory_mib,
            drives=(Drive(self.images.rootfs, read_only=True), writable), accel=self.accel,
            memory_file=memory or MemoryFile(self.memory_file, shared=False), extra_cmdline=self.kernel_args,
        )


async def planned_template(spec: TemplateSpec, backend: VMBackend) -> BuiltTemplate:
    """Where this spec's build lives, given today's images, accelerator and VMM (built or not)."""
    images = planned_images(spec.debian_packages, spec.python_wheels)
    accel = host_accelerator()
    kernel_args = await asyncio.to_thread(accel.guest_kernel_args)
    key = digest("template", asdict(spec), images.key, accel.name, accel.qemu_args, kernel_args, backend.name,
                 backend.layout_version, await backend.version())
    return BuiltTemplate(spec, images, accel, templates_cache_dir() / f"{spec.name}-{key}", kernel_args)


async def find_built(name: str, backend: VMBackend) -> BuiltTemplate:
    template = await planned_template(load_template(name), backend)
    if not template.is_built():
        stale = sorted(templates_cache_dir().glob(f"{name}-*"))
        why = "was built from other inputs (images, spec, accelerator or QEMU changed)" if stale else "is not built"
        raise TemplateMissing(f"template {name!r} {why}: run `vmcell template build {name}`")
    return template


async def build_template(name: str, backend: VMBackend, progress: Progress, force: bool = False) -> BuiltTemplate:
    spec = load_template(name)
    await asyncio.to_thread(ensure_images, progress, spec.debian_packages, spec.python_wheels)
    template = await planned_template(spec, backend)
    with build_lock(template.directory.name):
        if template.is_built() and not force:
            progress.note(f"template {name!r} is up to date ({template.directory})")
            return template
        with atomic_output(template.directory) as scratch:
            scratch.mkdir()
            meta = await _boot_warm_snapshot(template, scratch, backend, progress)
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for old in templates_cache_dir().glob(f"{name}-*"):
            if old != template.directory and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)  # superseded builds only waste disk
    return template


@asynccontextmanager
async def cold_booted(backend: VMBackend, config: VMConfig, name: str) -> AsyncIterator[tuple[VM, GuestLink]]:
    """A VM booted from scratch with its agent answering; stopped and reaped on the way out."""
    workdir = Workdir.create()
    vm = link = None
    try:
        vm = await backend.boot(config, workdir)
        link = await GuestLink.connect(vm.link_path, name=name)
        await link.handshake(COLD_BOOT_TIMEOUT_S)
        yield vm, link
    except VmcellError as exc:
        if vm is not None:  # what the guest printed is usually the explanation
            exc.add_note(f"--- guest console (last lines) ---\n{vm.console_tail()}")
        raise
    finally:
        if link is not None:
            await link.close()
        if vm is not None:
            await vm.stop()
        workdir.remove()


async def _warm_and_snapshot(template: BuiltTemplate, kernel_key: bytes, link: GuestLink, vm: VM, out: Path,
                             progress: Progress, timings: dict) -> None:
    spec = template.spec
    with progress.step("IPython kernel start"):
        start = time.monotonic()
        kernel = KernelClient(link, kernel_key, preload=spec.preload)
        await kernel.start()
        timings["kernel_start_s"] = round(time.monotonic() - start, 2)
    if spec.warmup.strip():
        with progress.step("warm-up code (in the kernel, which stays warm in the snapshot)"):
            start = time.monotonic()
            warm = await kernel.run_internal(spec.warmup, timeout=WARMUP_TIMEOUT_S)
            if warm.error is not None:
                trace = "\n".join(warm.error.traceback) or f"{warm.error.name}: {warm.error.value}"
                raise TemplateBuildError(f"warm-up code of {spec.name!r} failed:\n{trace[-3000:]}")
            timings["warmup_s"] = round(time.monotonic() - start, 2)
    with progress.step("snapshot (disk and memory at one instant)"):
        start = time.monotonic()
        await link.request("sync", {})
        await vm.save_state(out / "state.bin")
        timings["snapshot_s"] = round(time.monotonic() - start, 2)


async def _boot_warm_snapshot(template: BuiltTemplate, out: Path, backend: VMBackend, progress: Progress) -> dict:
    spec, timings = template.spec, {}
    # Sessions of this template sign their kernel messages with it (the kernel in the snapshot holds it).
    kernel_key = secrets.token_hex(32).encode()
    rw_empty, rw = out / "rw-empty.img", out / "rw.img"
    for image in (rw_empty, rw):  # formatted twice rather than copied: stays sparse
        await asyncio.to_thread(make_ext4, None, image, RW_FS_LABEL, 0, True, spec.disk_mib)
    config = template.vm_config(Drive(rw), MemoryFile(out / "memory.bin", shared=True))
    title = f"cold boot of {spec.name!r} ({template.accel.name.upper()}, {spec.vcpus} vCPU, {spec.memory_mib} MiB)"
    try:
        async with AsyncExitStack() as stack:
            with progress.step(title):
                start = time.monotonic()
                vm, link = await stack.enter_async_context(cold_booted(backend, config, f"template {spec.name}"))
                timings["boot_s"] = round(time.monotonic() - start, 2)
            await _warm_and_snapshot(template, kernel_key, link, vm, out, progress, timings)
    except VmcellError as exc:
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
        raise TemplateBuildError(f"building template {spec.name!r} failed: {exc}{notes}") from exc
    # Backing files of every session from now on. (memory.bin stays writable for QEMU to open it, but
    # sessions map it private: no session writes reach it.)
    for frozen in (rw, rw_empty):
        frozen.chmod(0o444)
    return {
        "name": spec.name, "spec": asdict(spec), "accel": template.accel.name, "accel_reason": template.accel.reason,
        "vmm": backend.name, "vmm_version": await backend.version(), "built_at": time.time(),
        "images": {k: str(v) for k, v in asdict(template.images).items()},
        "state_bytes": (out / "state.bin").stat().st_size, "timings": timings,
        "kernel_key": kernel_key.decode(),
    }
