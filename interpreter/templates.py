"""Templates: a spec in templates/NAME.toml, built into a warm, snapshotted VM under $VMCELL_HOME.

A built template is a directory keyed by a hash of everything it was made from (images, spec,
accelerator, VMM version) holding:
  rw-empty.img  the writable layer as first formatted (for cold boots)
  rw.img        the writable layer as it was at snapshot time (read-only backing of every session)
  memory.bin    the VM's RAM at snapshot time (sessions map it copy-on-write)
  state.bin     the VM's device state (CPU, virtio queues, ...)
  meta.json     what it was built from and how long each step took
  lease         every process serving the build holds a shared flock on it (see Lease): a build in use is
                never deleted or replaced
The disk, the RAM and the device state are captured at the same instant (the VM is stopped, disks flushed),
which is what makes restoring them together consistent.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
import tomllib
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import AsyncIterator

from .config import COLD_BOOT_TIMEOUT_S, RW_FS_LABEL, TEMPLATES_DIR, templates_cache_dir
from .errors import InvalidRequest, TemplateBuildError, TemplateMissing, VmcellError
from .images import GuestImages, ensure_images, make_ext4, planned_images
from .images.cache import KEY_LENGTH, atomic_output, build_lock, digest
from .kernel import Kernel
from .kernel.agent import AgentClient
from .kernel.link import GuestLink
from .network import NetworkPolicy
from .progress import Progress
from .vm.accel import Accelerator, host_accelerator
from .vm.backend import VM, Drive, MemoryFile, VMBackend, VMConfig
from .vm.workdir import Workdir

log = logging.getLogger("vmcell.templates")

# The kernels the guest can run in a code context (guest/vmcell_guest/kernel.py LANGUAGES).
KERNEL_LANGUAGES = ("python", "bash")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_BUILD_DIR = re.compile(rf"^(?P<name>[a-z0-9][a-z0-9_-]{{0,31}})-(?P<key>[0-9a-f]{{{KEY_LENGTH}}})$")
WARMUP_TIMEOUT_S = 900.0
LEASE_FILE = "lease"


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
    # Modules the guest's kernel fork server imports once, so every restarted kernel has them warm.
    preload: tuple[str, ...] = field(default=())
    # Sessions' network when they do not say: {"allow": [...]} (interpreter/network/policy.py), or None.
    network: dict | None = field(default=None, hash=False)
    # The languages its code contexts may run (sessions/contexts.py); python (the default kernel) first.
    kernels: tuple[str, ...] = field(default=("python",))

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
        if not self.kernels or self.kernels[0] != "python" or len(set(self.kernels)) != len(self.kernels) \
                or not set(self.kernels) <= set(KERNEL_LANGUAGES):
            problems.append(f"kernels must list distinct languages of {', '.join(KERNEL_LANGUAGES)}, "
                            "python (the default kernel) first")
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
            network=raw.get("network"),
            kernels=tuple(str(k) for k in raw.get("kernels", ("python",))),
        )
        NetworkPolicy.parse(spec.network)  # a bad default is the spec's error, not a session's
    except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
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

    @cached_property
    def meta(self) -> dict:
        """Read once per BuiltTemplate (a served template restores many sessions; its build never changes)."""
        return json.loads((self.directory / "meta.json").read_text())

    @property
    def kernel_key(self) -> bytes:
        return self.meta["kernel_key"].encode()

    @cached_property
    def network_default(self):
        """The spec's network as a NetworkPolicy (None: sessions get no network unless they ask)."""
        return NetworkPolicy.parse(self.spec.network)

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


def plan_template(spec: TemplateSpec, backend: VMBackend, vmm_version: str) -> BuiltTemplate:
    """Where this spec's build lives, given today's images, accelerator and VMM (built or not).
    Hashes the guest sources, the recipes and the wheel lock: call it off the IO loop."""
    images = planned_images(spec.debian_packages, spec.python_wheels)
    accel = host_accelerator()
    kernel_args = accel.guest_kernel_args()
    key = digest("template", asdict(spec), images.key, accel.name, accel.machine_args, accel.microvm_options,
                 kernel_args, backend.name, backend.layout_version, vmm_version)
    return BuiltTemplate(spec, images, accel, templates_cache_dir() / f"{spec.name}-{key}", kernel_args)


async def planned_template(spec: TemplateSpec, backend: VMBackend) -> BuiltTemplate:
    vmm_version = await backend.version()
    return await asyncio.to_thread(plan_template, spec, backend, vmm_version)


def builds_of(name: str) -> list[Path]:
    """The finished build directories of template `name` (any key), newest first."""
    found = []
    for path in templates_cache_dir().glob(f"{name}-*"):
        match = _BUILD_DIR.match(path.name)  # "python-<key>", not "python-ml-<key>" nor ".python-<key>.partial-N"
        if match and match["name"] == name and (path / "meta.json").is_file():
            found.append(path)
    return sorted(found, key=lambda p: (p / "meta.json").stat().st_mtime, reverse=True)


def built_or_missing(name: str, backend: VMBackend, vmm_version: str) -> BuiltTemplate:
    """The build of today's inputs of template `name`, or TemplateMissing naming the fix. Hashes (see plan_template)."""
    template = plan_template(load_template(name), backend, vmm_version)
    if not template.is_built():
        why = ("was built from other inputs (guest code, recipes, spec, accelerator or QEMU changed)"
               if builds_of(name) else "is not built")
        raise TemplateMissing(f"template {name!r} {why}: run `vmcell template build {name}`")
    return template


async def find_built(name: str, backend: VMBackend) -> BuiltTemplate:
    """For one-off callers (the CLI). A server resolves templates once, through a TemplateCatalog."""
    vmm_version = await backend.version()
    return await asyncio.to_thread(built_or_missing, name, backend, vmm_version)


class Lease:
    """A shared flock on a build's lease file, held for as long as a process may restore from the build.
    A build never deletes or replaces a directory whose lease is held (it asks for an exclusive lock
    without waiting). The kernel drops the lock with the process, however it ends."""

    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd

    @classmethod
    def take(cls, directory: Path) -> "Lease | None":
        """None if the build is gone or is being deleted or replaced right now."""
        try:
            fd = os.open(directory / LEASE_FILE, os.O_RDONLY | os.O_CREAT, 0o644)  # not inherited by QEMU
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        lease = cls(directory, fd)
        # Between our open and our lock the build may have been moved aside to be deleted, or replaced:
        # the lock counts only if it is on the lease file the directory holds now, next to a finished build.
        try:
            here, ours = os.stat(directory / LEASE_FILE), os.fstat(fd)
            current = (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino) and (directory / "meta.json").is_file()
        except OSError:
            current = False
        if not current:
            lease.release()
            return None
        return lease

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


def _lock_exclusive(directory: Path) -> int | None:
    """An fd holding the exclusive lock of `directory`'s lease, or None while some process leases it."""
    try:
        fd = os.open(directory / LEASE_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return -1  # no directory: nothing to protect
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lease_held(directory: Path) -> bool:
    """Whether some process (this one included) leases the build in `directory`."""
    fd = _lock_exclusive(directory)
    if fd is None:
        return True
    if fd >= 0:
        os.close(fd)
    return False


def remove_superseded(name: str, keep: Path, progress: Progress | None = None) -> tuple[list[Path], list[Path]]:
    """Deletes template `name`'s builds other than `keep`, except those a running process leases.
    Returns (removed, kept because leased)."""
    removed, kept = [], []
    for old in templates_cache_dir().glob(f"{name}-*"):
        match = _BUILD_DIR.match(old.name)
        if old == keep or not match or match["name"] != name:
            continue
        fd = _lock_exclusive(old)
        if fd is None:
            kept.append(old)
            if progress is not None:
                progress.note(f"kept superseded build {old.name}: a running server is restoring sessions from it "
                              "(its lease is held); a later build removes it once that server has stopped")
            continue
        try:
            # Out of the way first (a server looking it up now finds nothing), then deleted.
            doomed = old.with_name(f".{old.name}.removing-{os.getpid()}")
            shutil.rmtree(doomed, ignore_errors=True)
            try:
                os.replace(old, doomed)
            except OSError:
                doomed = old
            shutil.rmtree(doomed, ignore_errors=True)  # superseded builds only waste disk
        finally:
            if fd >= 0:
                os.close(fd)
        removed.append(old)
        if progress is not None:
            progress.note(f"removed superseded build {old.name}")
    return removed, kept


async def build_template(name: str, backend: VMBackend, progress: Progress, force: bool = False) -> BuiltTemplate:
    spec = load_template(name)
    await asyncio.to_thread(ensure_images, progress, spec.debian_packages, spec.python_wheels)
    template = await planned_template(spec, backend)
    with build_lock(template.directory.name):
        if template.is_built() and not force:
            progress.note(f"template {name!r} is up to date ({template.directory})")
            # What a server held until it was restarted on this build can go now.
            remove_superseded(name, template.directory, progress)
            return template
        # Held until the new build has replaced the old one: no server leases it meanwhile.
        replacing = _lock_exclusive(template.directory)
        if replacing is None:
            raise TemplateBuildError(
                f"template {name!r} build {template.key} is in use by a running vmcell server (its lease is held): "
                "--force would replace it under that server; stop the server first")
        try:
            with atomic_output(template.directory) as scratch:
                scratch.mkdir()
                (scratch / LEASE_FILE).touch()
                meta = await _boot_warm_snapshot(template, scratch, backend, progress)
                (scratch / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        finally:
            if replacing >= 0:
                os.close(replacing)
        remove_superseded(name, template.directory, progress)
    return template


@asynccontextmanager
async def cold_booted(backend: VMBackend, config: VMConfig, name: str) -> AsyncIterator[tuple[VM, AgentClient]]:
    """A VM booted from scratch with its agent answering; stopped and reaped on the way out."""
    workdir = Workdir.create()
    vm = link = None
    try:
        vm = await backend.boot(config, workdir)
        link = await GuestLink.connect(vm.link_path, name=name)
        agent = AgentClient(link)
        await agent.handshake(COLD_BOOT_TIMEOUT_S)
        yield vm, agent
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


async def _warm_and_snapshot(template: BuiltTemplate, kernel_key: bytes, agent: AgentClient, vm: VM, out: Path,
                             progress: Progress, timings: dict) -> None:
    spec = template.spec
    with progress.step("IPython kernel start"):
        start = time.monotonic()
        kernel = Kernel.attach(agent, kernel_key, preload=spec.preload)
        await kernel.lifecycle.start()
        timings["kernel_start_s"] = round(time.monotonic() - start, 2)
    if spec.warmup.strip():
        with progress.step("warm-up code (in the kernel, which stays warm in the snapshot)"):
            start = time.monotonic()
            warm = await kernel.engine.execute(spec.warmup, timeout=WARMUP_TIMEOUT_S, silent=True)
            if warm.error is not None:
                trace = "\n".join(warm.error.traceback) or f"{warm.error.name}: {warm.error.value}"
                raise TemplateBuildError(f"warm-up code of {spec.name!r} failed:\n{trace[-3000:]}")
            timings["warmup_s"] = round(time.monotonic() - start, 2)
    with progress.step("snapshot (disk and memory at one instant)"):
        start = time.monotonic()
        await agent.sync()
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
                vm, agent = await stack.enter_async_context(cold_booted(backend, config, f"template {spec.name}"))
                timings["boot_s"] = round(time.monotonic() - start, 2)
            await _warm_and_snapshot(template, kernel_key, agent, vm, out, progress, timings)
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
