"""QEMU `-M microvm` backend.

Devices (their order is part of every snapshot): the drives as virtio-blk-device, one
virtio-serial-device with the agent port and the egress port (network/egress.py; in every VM, used
only by sessions with network), the console on the ISA serial port into a log file, QMP on
a Unix socket. A restore starts QEMU with the same devices plus `-incoming defer`, then streams the
state into a Unix socket QEMU listens on; a save streams out of QEMU into one of ours. (QEMU never
spawns a process, `exec:` migration included: its seccomp filter forbids it.)

Where the host allows it, every QEMU starts in a jail (interpreter/jail/): its own uid, a mount
namespace with only its files, its cgroups. The backend asks the jailer for a Launch, the child
process enters it before exec, and the jail is released when QEMU is gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

from ..config import QEMU_BINARY, QEMU_IMG_BINARY, QEMU_SANDBOX, VM_STOP_GRACE_S
from ..errors import SnapshotError, VMMNotFound, VMStartError
from ..jail import Confinement, Jailer, Launch, enter_jail
from .backend import VM, Drive, Snapshot, VMBackend, VMConfig
from .process import ADOPTED_EXIT, AdoptedProcess
from .qmp import QMPClient, QMPError
from .ramsplit import receive_file, receive_split, send_file
from . import reclaim
from .workdir import Workdir, read_record
from vmcell_guest.egress_wire import EGRESS_PORT_NAME
from vmcell_guest.wire import AGENT_PORT_NAME

log = logging.getLogger("vmcell.vm")

_PR_SET_PDEATHSIG = 1
_QMP_WAIT_S = 10.0
# QEMU throttles outgoing migration to 128 MiB/s by default; a snapshot to a local file need not wait.
_SNAPSHOT_BANDWIDTH = 16 * 1024**3


def qemu_binary() -> str:
    found = shutil.which(QEMU_BINARY)
    if not found:
        raise VMMNotFound(f"{QEMU_BINARY} not found on PATH: install it with `apt-get install qemu-system-x86` "
                          "(or run `make setup`)")
    return found


def _preexec(parent_pid: int, die_with_owner: bool, nice: int, launch: Launch | None):
    if launch is not None:
        return lambda: enter_jail(launch.plan, parent_pid, die_with_owner, nice)
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        if nice:
            os.nice(nice)  # before exec: every QEMU thread inherits it
        if die_with_owner:
            # An ephemeral VM must not outlive its owner, even one killed with SIGKILL.
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the owner died before prctl took effect
                os._exit(1)

    return preexec


class QemuVM(VM):
    def __init__(self, workdir: Workdir, config: VMConfig, process: asyncio.subprocess.Process, qmp: QMPClient,
                 jailer: Jailer | None = None, launch: Launch | None = None):
        self.workdir, self.config, self.accel = workdir, config, config.accel
        self._process, self._qmp = process, qmp
        self._jailer, self.launch = jailer, launch
        self._stopped = False
        self._releasing: asyncio.Task | None = None  # paging out what a capture faulted in (reclaim.py)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def link_path(self) -> Path:
        return self.workdir.vmm_file("link.sock")

    @property
    def egress_path(self) -> Path:
        return self.workdir.vmm_file("egress.sock")

    @property
    def console_log(self) -> Path:
        return self.workdir.vmm_file("console.log")

    @property
    def uid(self) -> int | None:
        """The jailed QEMU's uid (None: not jailed)."""
        return None if self.launch is None else self.launch.uid

    def running(self) -> bool:
        return self._process.returncode is None

    def exit_description(self, status: int | None) -> str:
        if status is None:
            return "still running"
        if isinstance(self._process, AdoptedProcess) and status == ADOPTED_EXIT:
            return "exited; status unknown, it was adopted from an earlier server"
        return f"killed by signal {-status}" if status < 0 else f"exit status {status}"

    def renice(self, nice: int) -> None:
        """Every QEMU thread's priority (Linux nice values are per thread)."""
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
            except (ProcessLookupError, ValueError):
                pass

    async def pause(self) -> None:
        await self._qmp.execute("stop")

    async def resume(self) -> None:
        await self._qmp.execute("cont")

    async def snapshot(self, directory: Path, copy_disk: bool, runs_on: bool = False) -> Snapshot:
        """Stops the VM and captures it: QEMU streams its whole state (RAM included: a session's RAM
        is a private mapping) to a socket of ours, which ramsplit.py splits into a sparse RAM image
        and a RAM-less state. The VM is left paused (`resume` it, or stop it). `runs_on`: it will be
        resumed, so the RAM pages the capture faulted in are paged out again afterwards (reclaim.py)."""
        await self._qmp.execute("stop")  # also drains and flushes the disks
        held = await asyncio.to_thread(self._resident_ram) if runs_on else None
        disk = None
        if copy_disk:
            disk = directory / "disk.qcow2"
            await asyncio.to_thread(shutil.copyfile, self.config.drives[-1].path, disk)
        memory, state = directory / "memory.bin", directory / "state.bin"
        socket_path = self.workdir.vmm_file("snapshot.sock")  # short: Unix socket paths are limited
        await self._migrate_out(socket_path, receive_split(socket_path, memory, state, self.uid), "capturing the VM")
        if held is not None and (self._releasing is None or self._releasing.done()):
            # In the background: the caller resumes the VM meanwhile (a page it touches again just refaults).
            self._releasing = asyncio.create_task(asyncio.to_thread(self._page_out_unheld, *held))
        return Snapshot(memory=memory, state=state, disk=disk)

    def _resident_ram(self) -> tuple[int, bytes] | None:
        """Where the guest RAM is mapped, and which of its pages are resident (None: not knowable)."""
        memory = self.config.memory_file
        if memory is None or memory.shared:
            return None  # shared RAM is left out of captures (x-ignore-shared): nothing gets faulted in
        try:
            span = reclaim.mapping_of(self.pid, memory.path)
            return None if span is None else (span[0], reclaim.resident_pages(self.pid, *span))
        except OSError as exc:
            log.debug("qemu %s: guest RAM residency unreadable (%s)", self.pid, exc)
            return None

    def _page_out_unheld(self, start: int, held: bytes) -> None:
        try:
            reclaim.page_out(self.pid, reclaim.absent_ranges(held, start))
        except ProcessLookupError:
            pass  # it has exited meanwhile: nothing is held any more
        except OSError as exc:
            log.info("qemu %s keeps the RAM pages its capture read until memory pressure reclaims them: "
                     "process_madvise(MADV_PAGEOUT) failed (%s; it needs CAP_SYS_NICE)", self.pid, exc)

    async def _wait_migration(self) -> None:
        while True:
            info = await self._qmp.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled", None):
                raise SnapshotError(f"saving VM state failed: {info!r}")
            await asyncio.sleep(0.01)

    async def detach(self) -> None:
        """Closes our QMP connection and leaves QEMU running (it is not our child to wait for after we exit)."""
        self._stopped = True
        await self._qmp.close()

    async def wait_exit(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self._process.wait()), timeout)
        except asyncio.TimeoutError:
            return None

    async def save_state(self, state_file: Path) -> None:
        try:
            await self._qmp.execute("stop")  # also drains and flushes the disks
        except QMPError as exc:
            raise SnapshotError(f"saving VM state failed: {exc}") from None
        socket_path = self.workdir.vmm_file("save.sock")
        await self._migrate_out(socket_path, receive_file(socket_path, state_file, self.uid), "saving VM state")

    async def _migrate_out(self, socket_path: Path, receiving, what: str) -> None:
        """Streams the (stopped) VM's state to `receiving`, a listener of ours on `socket_path`."""
        try:
            await self._qmp.execute("migrate-set-parameters", **{"max-bandwidth": _SNAPSHOT_BANDWIDTH})
            await self._set_ignore_shared()
            await self._qmp.execute("migrate", uri=f"unix:{socket_path}")
            await self._wait_migration()
            await receiving.result()
        except QMPError as exc:
            raise SnapshotError(f"{what} failed: {exc}") from None
        finally:
            receiving.cancel()
            socket_path.unlink(missing_ok=True)

    async def _set_ignore_shared(self) -> None:
        # With file-backed RAM the file is the memory: states leave it out on both ends.
        if self.config.memory_file is not None:
            await self._qmp.execute("migrate-set-capabilities",
                                    capabilities=[{"capability": "x-ignore-shared", "state": True}])

    async def load_state(self, state_file: Path, timeout: float = 60.0) -> None:
        """Feeds a saved state to a VM started with `-incoming defer`. The state was saved from a
        stopped VM, so it arrives paused: wait for it to load, then run."""
        await self._set_ignore_shared()
        socket_path = self.workdir.vmm_file("incoming.sock")
        await self._qmp.execute("migrate-incoming", uri=f"unix:{socket_path}")  # QEMU listens once this returns
        try:
            await send_file(socket_path, state_file)
        except OSError as exc:
            raise VMStartError(f"feeding the saved state to QEMU failed: {exc}") from None
        finally:
            socket_path.unlink(missing_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            status = (await self._qmp.execute("query-status"))["status"]
            if status in ("paused", "postmigrate", "prelaunch"):
                await self._qmp.execute("cont")
                return
            if status == "running":
                return
            if status != "inmigrate" or not self.running():
                raise VMStartError(f"restoring the VM state failed (status {status!r}): {self.console_tail(5)}")
            if time.monotonic() > deadline:
                raise VMStartError(f"restoring the VM state took over {timeout:.0f}s")
            await asyncio.sleep(0.005)

    async def stop(self, remove_workdir: bool = True) -> None:
        """Quits QEMU (then kills it). `remove_workdir=False` keeps the directory: a saved session's
        disk and state live there until it is restored."""
        if self._stopped:
            if remove_workdir:
                self.workdir.remove()
            return
        self._stopped = True
        try:
            if self.running():
                try:
                    await asyncio.wait_for(self._qmp.execute("quit"), 1.0)
                except (QMPError, asyncio.TimeoutError, ConnectionError):
                    pass
                try:
                    await asyncio.wait_for(self._process.wait(), VM_STOP_GRACE_S)
                except asyncio.TimeoutError:
                    log.warning("qemu %s ignored quit; killing it", self.pid)
                    self._process.kill()
                    await self._process.wait()
            await self._qmp.close()
        finally:
            if self.running():  # cancelled mid-stop: never leave it behind
                self._process.kill()
            await self._release_jail()
            if remove_workdir:
                self.workdir.remove()

    async def _release_jail(self) -> None:
        if self.launch is not None and self._jailer is not None and not self.running():
            launch, self.launch = self.launch, None
            # Off the loop: removing a cgroup may wait for the kernel to let go of the exited process.
            await asyncio.shield(asyncio.to_thread(self._jailer.release, launch))

    def console_tail(self, lines: int = 30) -> str:
        try:
            # O_NOFOLLOW: the file is the (jailed) QEMU's; a link it planted must not make us read ours.
            fd = os.open(self.console_log, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                f.seek(max(0, os.fstat(fd).st_size - 64 * 1024))
                text = f.read().decode(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        except OSError:
            return ""


_DETECT = object()


class QemuBackend(VMBackend):
    name = "qemu-microvm"
    layout_version = 4  # 3: the egress port; 4: sockets and console log in vmm/ (the jail)

    def __init__(self, jailer: Jailer | None = _DETECT) -> None:  # type: ignore[assignment]
        """`jailer`: by default what the host allows (jail/jailer.py: Jailer.detect); None: no jail."""
        self._version: str | None = None
        self._jailer = jailer
        self.confinement: Confinement | None = None
        if jailer is not _DETECT:
            self.confinement = Confinement(jailer is not None, "given" if jailer else "off: not asked for",
                                           jailer is not None and jailer.cgroups is not None, "given")

    async def jailer(self) -> Jailer | None:
        if self._jailer is _DETECT:
            self._jailer, self.confinement = await asyncio.to_thread(Jailer.detect)
            for ok, line in self.confinement.lines():
                (log.info if ok else log.warning)("%s", line)
        return self._jailer

    async def version(self) -> str:
        if self._version is None:
            proc = await asyncio.create_subprocess_exec(qemu_binary(), "--version", stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            self._version = out.decode().splitlines()[0].strip()
        return self._version

    async def overlay(self, backing: Path, path: Path, backing_format: str = "raw") -> Drive:
        proc = await asyncio.create_subprocess_exec(
            shutil.which(QEMU_IMG_BINARY) or QEMU_IMG_BINARY, "create", "-q", "-f", "qcow2", "-F", backing_format,
            "-b", str(backing), str(path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise VMStartError(f"qemu-img could not create the overlay {path.name}: {err.decode().strip()}")
        return Drive(path, format="qcow2")

    def argv(self, config: VMConfig, workdir: Workdir, incoming: bool = False, memory_fd: int | None = None) -> list[str]:
        """`memory_fd`: the guest RAM image as an inherited (sealed) fd rather than its path."""
        cmdline = " ".join((config.cmdline, *config.extra_cmdline))
        machine = ["microvm", *config.accel.microvm_options] + (["memory-backend=ram"] if config.memory_file else [])
        argv = [
            qemu_binary(), "-name", f"vmcell-{workdir.id}", "-sandbox", QEMU_SANDBOX,
            "-M", ",".join(machine), *config.accel.qemu_args,
            "-smp", str(config.vcpus), "-m", f"{config.memory_mib}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(config.kernel), "-initrd", str(config.initramfs), "-append", cmdline,
            "-chardev", f"file,id=console,path={workdir.vmm_file('console.log')}", "-serial", "chardev:console",
        ]
        if config.memory_file:
            mem = config.memory_file
            mem_path = mem.path if memory_fd is None else f"/proc/self/fd/{memory_fd}"
            argv += ["-object", f"memory-backend-file,id=ram,size={config.memory_mib}M,mem-path={mem_path},"
                                f"share={'on' if mem.shared else 'off'}"]
        for i, drive in enumerate(config.drives):
            ro = ",readonly=on" if drive.read_only else ""
            argv += ["-drive", f"id=disk{i},file={drive.path},format={drive.format},if=none,cache=writeback{ro}",
                     "-device", f"virtio-blk-device,drive=disk{i}"]
        argv += [
            # Port 0 is reserved for a console: the agent is port 1, egress port 2.
            "-device", "virtio-serial-device,max_ports=3",
            "-chardev", f"socket,id=link,path={workdir.vmm_file('link.sock')},server=on,wait=off",
            "-device", f"virtserialport,chardev=link,name={AGENT_PORT_NAME}",
            # The guest's only way out, to the host's proxy (interpreter/network/); no NIC, ever.
            "-chardev", f"socket,id=egress,path={workdir.vmm_file('egress.sock')},server=on,wait=off",
            "-device", f"virtserialport,chardev=egress,name={EGRESS_PORT_NAME}",
            "-qmp", f"unix:{workdir.vmm_file('qmp.sock')},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]  # the state is fed over QMP once capabilities are set
        return argv

    async def _start(self, config: VMConfig, workdir: Workdir, incoming: bool = False, die_with_owner: bool = True,
                     nice: int = 0) -> QemuVM:
        for stale in ("link.sock", "qmp.sock", "egress.sock"):  # a saved session's directory is reused
            workdir.vmm_file(stale).unlink(missing_ok=True)
        jailer = await self.jailer()
        launch = await asyncio.to_thread(jailer.prepare, config, workdir) if jailer is not None else None
        try:
            argv = self.argv(config, workdir, incoming, memory_fd=launch.memory_fd if launch else None)
            log_file = open(workdir.file("qemu.log"), "ab")
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    start_new_session=True,  # a Ctrl-C on the terminal is ours to handle, not QEMU's
                    pass_fds=launch.pass_fds if launch else (),
                    preexec_fn=_preexec(os.getpid(), die_with_owner, nice, launch),
                )
            finally:
                log_file.close()
        except BaseException:
            if launch is not None:
                await asyncio.to_thread(jailer.release, launch)
            raise
        jail = {"uid": launch.uid, "cgroup": launch.cgroup} if launch else {}
        workdir.record_qemu(process.pid, **jail)
        log.debug("qemu %s started%s: %s", process.pid, f" as uid {launch.uid}" if launch else "", shlex.join(argv))
        vm = QemuVM(workdir, config, process, None, jailer, launch)  # type: ignore[arg-type]
        try:
            vm._qmp = await self._connect_qmp(process, workdir)
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await vm._release_jail()
            raise
        return vm

    async def _connect_qmp(self, process: asyncio.subprocess.Process, workdir: Workdir) -> QMPClient:
        deadline = time.monotonic() + _QMP_WAIT_S
        path = workdir.vmm_file("qmp.sock")
        while True:
            if process.returncode is not None:
                err = workdir.file("qemu.log").read_text(errors="replace").strip()
                raise VMStartError(f"qemu exited with status {process.returncode} while starting: {err[-2000:]}")
            if path.exists():
                try:
                    return await QMPClient.connect(path)
                except (ConnectionError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise VMStartError(f"qemu did not open its QMP socket within {_QMP_WAIT_S:.0f}s")
            await asyncio.sleep(0.005)

    async def boot(self, config: VMConfig, workdir: Workdir) -> QemuVM:
        return await self._start(config, workdir)

    async def attach(self, config: VMConfig, workdir: Workdir) -> QemuVM:
        record = read_record(workdir.file("qemu.pid"))
        try:
            process = AdoptedProcess(record.get("pid", -1), record.get("start_time"))
        except (ProcessLookupError, TypeError, OSError) as exc:
            raise VMStartError(f"the VM in {workdir.path} is not running ({exc})") from None
        try:
            qmp = await QMPClient.connect(workdir.vmm_file("qmp.sock"))
        except (ConnectionError, OSError) as exc:
            raise VMStartError(f"cannot reach the QMP socket of the VM in {workdir.path}: {exc}") from None
        jailer = await self.jailer()
        launch = jailer.adopt(record.get("uid"), record.get("cgroup")) if jailer is not None else None
        return QemuVM(workdir, config, process, qmp, jailer, launch)

    async def restore(self, config: VMConfig, workdir: Workdir, state_file: Path, die_with_owner: bool = True,
                      nice: int = 0) -> QemuVM:
        if not state_file.is_file():
            raise VMStartError(f"snapshot state {state_file} is missing")
        vm = await self._start(config, workdir, incoming=True, die_with_owner=die_with_owner, nice=nice)
        try:
            await vm.load_state(state_file)
        except BaseException:
            await vm.stop()
            raise
        return vm
