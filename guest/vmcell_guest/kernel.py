"""The guest's IPython kernel: its process tree, and the relay between its ZMQ sockets and the link.

The kernel listens on ipc sockets under /run/vmcell. It is forked by the warm fork server
(forkserver.py; `mode: "exec"` starts a fresh `python -m ipykernel_launcher` instead) into the
kernel cgroup (cgroup.py), which holds it and everything it spawns, so a restart or
`kill_children` reaches the whole tree and a runaway tree cannot take the agent with it.

One relay thread owns every ZMQ socket: it forwards frames the host sent (handed over through an
inproc PAIR, since ZMQ sockets must stay on one thread) and sends every kernel message to the host
as a multipart frame on its channel. It notes when a cell starts (an execute_request forwarded on
SHELL) and sees the kernel exit through a pidfd (whoever its parent is); the exit status comes
from the parent (the fork server's report, or the exec path's wait). It also knows which
execute_request the kernel is running (`busy_with` in the status), from the request going in to
its execute_reply or idle status coming out: a host that did not send it (it restarted) can end it.

The memory high-water mark: the kernel cgroup's memory.high sits a margin below memory.max. The
relay thread watches memory.events (inotify: no cost while nothing happens); when a running cell
pushes what the guest cannot reclaim past the mark, it tells the host (`memory_limit`, action
`interrupt`), leaves a note for the IPython extension (which reports the KeyboardInterrupt as
MemoryLimitExceeded and frees the interrupted frames), and SIGINTs the kernel, before the OOM
killer fires. An OOM kill of one of the cell's processes that the kernel survived is reported when
the cell errs or ends (action `oom_kill`); the kernel's own is `kernel_died` with `oom_killed`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable

import zmq

from .cgroup import DEFAULT_MEMORY_RESERVE_MIB, KERNEL, KernelCgroup, boottime_ticks, proc_stat
from .forkserver import ForkServerClient, ForkServerError
from .ops import ErrorKind, Event, OpError
from .wire import MAX_FRAME_BYTES, Channel, encode_control, encode_multipart

RUN_DIR = "/run/vmcell"
CONNECTION_FILE = f"{RUN_DIR}/kernel.json"
# Pids of the kernel's own children that kill_children killed: the kernel reaps them before its next
# cell (ipython_ext.py), or their zombies would keep counting against pids.max.
REAP_FILE = f"{RUN_DIR}/reap.json"
# The cell interrupted at the memory high-water mark, and the figures: read by ipython_ext.py.
MEMORY_NOTE_FILE = f"{RUN_DIR}/memory-interrupt.json"
KERNEL_ARGS = ["-f", CONNECTION_FILE, "--ext=vmcell_guest.ipython_ext", "--HistoryManager.enabled=False"]
_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
_RELAY_INBOX = "inproc://vmcell-relay-inbox"
FORKSERVER_START_TIMEOUT_S = 300.0  # cold imports of the preload list under TCG (~20 s measured)
SPAWN_TIMEOUT_S = 60.0
EXIT_REPORT_WAIT_S = 1.0  # after the pidfd fires, for the parent's exit status
DRAIN_S = 0.2  # after the kernel died, for its last messages still in the sockets
KILL_TIMEOUT_S = 15.0  # kill_children: passes until the cgroup is frozen with nobody new, at most this
KILL_WAIT_S = 10.0  # for the killed to leave the cgroup
# execute_requests sent and not yet answered, oldest first (the host sends one at a time; a bound
# all the same, the guest must not grow with a host's mistakes).
MAX_TRACKED_CELLS = 1024


# The kernels a context may run (`language`), and how the fork server starts each (forkserver.py).
LANGUAGES = ("python", "bash")
DEFAULT_CWD = "/root"


class KernelPaths:
    """Where one slot's kernel lives. Slot 0 (the default kernel) keeps the paths of protocol 2;
    a code context N has its own directory and cgroup (docs/link-protocol.md, Code contexts)."""

    def __init__(self, slot: int = 0):
        self.slot = slot
        self.run_dir = RUN_DIR if slot == 0 else f"{RUN_DIR}/ctx-{slot}"
        self.connection_file = CONNECTION_FILE if slot == 0 else f"{self.run_dir}/kernel.json"
        self.reap_file = REAP_FILE if slot == 0 else f"{self.run_dir}/reap.json"
        self.memory_note_file = MEMORY_NOTE_FILE if slot == 0 else f"{self.run_dir}/memory-interrupt.json"
        self.cgroup = KERNEL if slot == 0 else f"{KERNEL}-{slot}"
        self.inbox = _RELAY_INBOX if slot == 0 else f"{_RELAY_INBOX}-{slot}-"

    def address(self, port_name: str) -> str:
        return f"ipc://{self.run_dir}/kernel-{_PORTS[port_name]}"

    def kernel_args(self, language: str) -> list[str]:
        if language == "python":
            return ["-f", self.connection_file, *KERNEL_ARGS[2:]]
        return ["-f", self.connection_file]


def _address(port_name: str) -> str:
    return KernelPaths(0).address(port_name)


class ForkServerShare:
    """The one warm fork server every slot's kernel is forked from, and the exits it reports,
    handed to the relay whose kernel it was (kernels of every slot are its children)."""

    def __init__(self) -> None:
        self.forkserver: ForkServerClient | None = None
        self.error: str | None = None
        self.preload_result: dict = {"imported": [], "failed": {}}
        self.relays: dict[int, "KernelRelay"] = {}
        self.exit_codes: dict[int, int | None] = {}  # pid -> status of kernels no relay knows (yet)
        self.lock = threading.Lock()  # one slot starts the fork server; the others wait for it

    def ensure(self, preload: list[str]) -> ForkServerClient:
        with self.lock:
            fs = self.forkserver
            if fs is None or not fs.alive:
                fs = self.forkserver = ForkServerClient(self.on_exit)
                self.error = None
                try:
                    ready = fs.wait_ready(FORKSERVER_START_TIMEOUT_S)
                except ForkServerError as exc:
                    self.error = str(exc)
                    fs.close()
                    raise
                self.preload_result = {"imported": ready.get("imported", []), "failed": ready.get("failed", {})}
            if preload:
                reply = fs.request({"op": "preload", "modules": preload}, FORKSERVER_START_TIMEOUT_S)
                self.preload_result = {"imported": reply.get("imported", []), "failed": reply.get("failed", {})}
            return fs

    def on_exit(self, pid: int, returncode: int | None) -> None:
        """The fork server's exit report (its reader thread): to the relay whose kernel it was."""
        relay = next((r for r in list(self.relays.values()) if r._kernel is not None and r._kernel.pid == pid),
                     self.relays.get(0))
        if relay is not None:
            relay._on_exit(pid, returncode)  # a kernel no relay knows yet: kept in exit_codes


class KernelProcess:
    """One kernel process, however it was started."""

    def __init__(self, pid: int, mode: str):
        self.pid = pid
        self.mode = mode
        self.returncode: int | None = None
        self.exited = threading.Event()  # the parent's exit report arrived
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = None  # gone already

    def alive(self) -> bool:
        if self.exited.is_set() or self.pidfd is None:
            return False
        return not select.select([self.pidfd], [], [], 0)[0]

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _threads(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


class KernelRelay:
    def __init__(self, send: Callable[[bytes], None], slot: int = 0, share: ForkServerShare | None = None,
                 language: str = "python", cwd: str = DEFAULT_CWD):
        self._send = send  # writes one encoded frame to the link
        self.slot = slot
        self.paths = KernelPaths(slot)
        self.language = language
        self.cwd = cwd
        self._share = share or ForkServerShare()
        self._share.relays[slot] = self
        self._ctx = zmq.Context()
        self._start_lock = threading.Lock()  # start / kill_children: one at a time
        self._inbox_lock = threading.Lock()  # the host-side inbox socket (held briefly: the reader thread takes it)
        self._kernel: KernelProcess | None = None
        self._inbox_push: zmq.Socket | None = None
        self._generation = 0
        self._relay: threading.Thread | None = None
        self._wake_w: int | None = None  # the relay thread's wake-up pipe
        self._cgroup = KernelCgroup(self.paths.cgroup)
        self._cgroup_ok = self._cgroup.available()
        self._limits: dict = {}
        self._exit_codes = self._share.exit_codes  # pid -> status, reported by a parent (shared by the slots)
        # The current cell: when its execute_request went to the kernel, and the counters then.
        self._cell_ticks = 0
        self._cell_pids_max = 0
        self._cell_oom_kills = 0
        self._cell_oom_reported = False
        # The memory high-water mark (memory.high; None: none) and its watch (inotify on memory.events).
        self._memory_high: int | None = None
        self._memory_watch: int | None = None
        self._mark_armed = False  # the current cell may still be interrupted at the mark
        self._high_lifted = False  # memory.high is "max" for now (the cell was interrupted, or began above it)
        # execute_requests forwarded and not finished, in the kernel's order: the first is running.
        self._busy_lock = threading.Lock()
        self._busy: deque[dict] = deque(maxlen=MAX_TRACKED_CELLS)

    # ---- process ---------------------------------------------------------------------------

    def start(self, key: str, env: dict[str, str], preload: list[str], limits: dict, mode: str) -> dict:
        with self._start_lock:
            self._generation += 1  # first: the old relay must not report its kernel's death as news
            began = time.monotonic()
            self._stop_relay()
            self._kill_tree()
            kill_ms = round((time.monotonic() - began) * 1000, 1)
            paths = self.paths
            os.makedirs(paths.run_dir, exist_ok=True)
            for leftover in [paths.reap_file, paths.memory_note_file,
                             *(f"{paths.run_dir}/kernel-{n}" for n in _PORTS.values())]:
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            with open(paths.connection_file, "w") as f:
                json.dump({**_PORTS, "transport": "ipc", "ip": f"{paths.run_dir}/kernel", "key": key,
                           "signature_scheme": "hmac-sha256",
                           "kernel_name": "python3" if self.language == "python" else self.language}, f)
            if self.slot:  # the kernel's own files (ipython_ext.py reads them from there)
                env = {**env, "VMCELL_RUN_DIR": paths.run_dir}
            began = time.monotonic()
            fallback = None
            if mode == "fork":
                try:
                    self._ensure_forkserver(preload)
                except ForkServerError as exc:
                    fallback = f"fork server: {exc}"
                    mode = "exec"
            if self._cgroup_ok:  # after the fork server's imports: the memory limit leaves them room
                applied = self._cgroup.create(limits.get("pids_max"),
                                              limits.get("memory_reserve_mib", DEFAULT_MEMORY_RESERVE_MIB),
                                              limits.get("memory_margin_mib"))
                self._setup_memory_mark(applied["memory_high"])
                self._limits = {"pids_max": applied["pids_max"], "memory_max": applied["memory_max"],
                                "memory_high": self._memory_high}
            if mode == "fork":
                try:
                    pid = self._spawn_forked(env)
                except ForkServerError as exc:
                    fallback = f"fork server: {exc}"
                    mode = "exec"
            if mode == "exec":
                pid = self._spawn_exec(env)
            spawn_ms = round((time.monotonic() - began) * 1000, 1)
            kernel = KernelProcess(pid, mode)
            if pid in self._exit_codes:  # died before we got here
                kernel.returncode = self._exit_codes.pop(pid)
                kernel.exited.set()
            self._kernel = kernel
            self._clear_busy()  # the old kernel's cells went with it
            self._note_cell_start()
            self._start_relay(kernel)
            result = {"pid": pid, "mode": mode, "kill_ms": kill_ms, "spawn_ms": spawn_ms, "limits": self._limits,
                      "preload": self._share.preload_result}
            if self.slot:
                result.update(context=self.slot, language=self.language, cwd=self.cwd)
            if fallback:
                result["fallback"] = fallback
            return result

    def _setup_memory_mark(self, high: int | None) -> None:
        if high is not None and self._memory_watch is None:
            self._memory_watch = self._cgroup.watch("memory.events")
        if high is not None and self._memory_watch is None:  # nobody would see it crossed: no throttling for nothing
            self._cgroup.set_high(None)
            high = None
        self._memory_high = high
        self._high_lifted = False

    def _ensure_forkserver(self, preload: list[str]) -> None:
        self._share.ensure(preload)

    def _spawn_forked(self, env: dict[str, str]) -> int:
        fs = self._share.forkserver
        if fs is None:
            raise ForkServerError("the fork server is not running")
        reply = fs.request({"op": "spawn", "argv": self.paths.kernel_args(self.language), "env": env,
                            "cwd": self.cwd, "kernel": self.language,
                            "cgroup": self._cgroup.path if self._cgroup_ok else None}, SPAWN_TIMEOUT_S)
        return int(reply["pid"])

    def _spawn_exec(self, env: dict[str, str]) -> int:
        module = "ipykernel_launcher" if self.language == "python" else "vmcell_guest.bashkernel"
        argv = [sys.executable, "-m", module, *self.paths.kernel_args(self.language)]
        if self._cgroup_ok:  # into the cgroup before exec: nothing of the kernel ever runs outside it
            argv = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && echo 0 > /proc/self/oom_score_adj && exec "$@"',
                    self._cgroup.path, *argv]
        try:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=dict(os.environ, **env), stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            raise OpError(ErrorKind.SpawnFailed, f"cannot start the kernel: {exc}") from None

        def wait() -> None:
            proc.wait()
            self._on_exit(proc.pid, proc.returncode)

        threading.Thread(target=wait, name=f"kernel-wait-{proc.pid}", daemon=True).start()
        return proc.pid

    def _on_exit(self, pid: int, returncode: int | None) -> None:
        """A parent's exit report (fork server reader or exec waiter thread): never blocks."""
        kernel = self._kernel
        if kernel is not None and kernel.pid == pid:
            kernel.returncode = returncode
            kernel.exited.set()
        else:
            self._exit_codes[pid] = returncode
            while len(self._exit_codes) > 64:
                self._exit_codes.pop(next(iter(self._exit_codes)))

    def _kill_tree(self) -> None:
        """The previous kernel and everything it spawned, gone before a new kernel starts."""
        old = self._kernel
        if self._cgroup_ok:
            if not self._cgroup.kill_all(timeout=10):
                raise OpError(ErrorKind.Internal, f"the kernel cgroup did not empty: {self._cgroup.procs()}")
        elif old is not None and old.alive():
            try:
                os.killpg(old.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if old is not None:
            old.exited.wait(5)  # reaped by its parent: no zombie left behind
            old.close()
            self._kernel = None

    def interrupt(self) -> dict:
        kernel = self._kernel
        if kernel is None or not kernel.alive():
            return {"alive": False}
        os.kill(kernel.pid, signal.SIGINT)
        return {"alive": True}

    def kill_children(self, everything: bool) -> dict:
        """Kills what the current cell started (everything=True: all but the kernel), race-free:
        the cgroup is frozen while we look and kill, and a new task is born frozen. A task stuck
        in the kernel (memory reclaim, the OOM killer) freezes only once it gets out, and may fork
        on its way (the kernel itself, stuck in a fork bomb's fork()), so we kill in passes until
        the whole cgroup reports frozen and a pass finds nobody new. A SIGKILLed task cannot fork."""
        with self._start_lock:
            kernel = self._kernel
            if kernel is None or not kernel.alive():
                raise OpError(ErrorKind.NoKernel, "no kernel is running")
            if not self._cgroup_ok:
                raise OpError(ErrorKind.Internal, "the guest has no cgroup2: cannot tell the kernel's processes apart")
            since = None if everything else self._cell_ticks
            victims: dict[int, int] = {}  # pid -> ppid
            spared: set[int] = {kernel.pid}
            passes = 0
            frozen = False
            self._cgroup.request_freeze()
            try:
                deadline = time.monotonic() + KILL_TIMEOUT_S
                delay = 0.001
                while True:
                    passes += 1
                    found = 0
                    for pid in self._cgroup.procs():
                        if pid in spared or pid in victims:
                            continue
                        stat = proc_stat(pid)
                        if stat is None:
                            continue
                        if since is not None and stat[1] < since:
                            spared.add(pid)  # started before this cell: not ours to kill
                            continue
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        victims[pid] = stat[0]
                        found += 1
                    frozen = self._cgroup.is_frozen()
                    if frozen and not found or time.monotonic() > deadline:
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
            finally:
                self._cgroup.thaw()
            gone = self._cgroup.wait_gone(set(victims), timeout=KILL_WAIT_S)
            orphans = [pid for pid, ppid in victims.items() if ppid == kernel.pid]
            if orphans:
                self._add_to_reap_list(orphans)
            return {"killed": len(victims), "frozen": frozen, "passes": passes, "gone": gone,
                    "pids_max_hit": self._cgroup.counter("pids.events", "max") > self._cell_pids_max}

    def _add_to_reap_list(self, pids: list[int]) -> None:
        reap_file = self.paths.reap_file
        try:
            with open(reap_file) as f:
                pids = list(set(json.load(f)) | set(pids))
        except (OSError, ValueError, TypeError):
            pass
        tmp = reap_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(sorted(pids), f)
        os.replace(tmp, reap_file)

    def status(self) -> dict:
        kernel = self._kernel
        result: dict = {
            "alive": kernel is not None and kernel.alive(),
            "pid": kernel.pid if kernel else None,
            "returncode": kernel.returncode if kernel else None,
            "mode": kernel.mode if kernel else None,
            "procs": None, "pids_max": None, "memory_current": None, "memory_max": None, "memory_high": None,
            "oom_kills": None,
            "controllers": [],
            "busy_with": self.busy_with() if kernel is not None and kernel.alive() else None,
        }
        if self._cgroup_ok:
            stats = self._cgroup.stats()
            result.update(procs=stats["procs"], memory_current=stats["memory_current"],
                          controllers=self._cgroup.controllers())
            for name in ("pids_max", "memory_max"):
                result[name] = stats[name] if stats[name] != -1 else None
            if "memory" in result["controllers"]:
                result["oom_kills"] = stats["oom_kills"]
                result["memory_high"] = self._memory_high
            # Did the current (or last) cell run into pids.max? The host asks after a cell that failed.
            result["pids_max_hit"] = self._cgroup.counter("pids.events", "max") > self._cell_pids_max
        fs = self._share.forkserver
        result["forkserver"] = None if fs is None else {
            "pid": fs.pid, "alive": fs.alive, "threads": _threads(fs.pid), "error": self._share.error,
            **self._share.preload_result}
        if self.slot:
            result.update(context=self.slot, language=self.language, cwd=self.cwd)
        return result

    def stop(self) -> dict:
        """The context is removed: its kernel tree killed, its relay stopped, its cgroup removed."""
        with self._start_lock:
            self._generation += 1  # its death is no news
            self._stop_relay()
            self._kill_tree()
            self._clear_busy()
            if self._memory_watch is not None:
                os.close(self._memory_watch)
                self._memory_watch = None
            self._cgroup.close()
            if self.slot and self._cgroup_ok:
                try:
                    os.rmdir(self._cgroup.path)
                except OSError:
                    pass
            self._share.relays.pop(self.slot, None)
            return {"context": self.slot}

    # ---- host -> kernel --------------------------------------------------------------------

    def forward(self, channel: Channel, parts: list[bytes]) -> None:
        with self._inbox_lock:
            if self._inbox_push is None:
                raise RuntimeError("no kernel is running")
            self._inbox_push.send_multipart([bytes([channel]), *parts])

    def _note_cell_start(self) -> None:
        self._cell_ticks = boottime_ticks()
        if self._cgroup_ok:
            self._cell_pids_max = self._cgroup.counter("pids.events", "max")
            self._cell_oom_kills = self._cgroup.counter("memory.events", "oom_kill")
            self._cell_oom_reported = False
            if self._memory_high is not None:
                self._arm_memory_mark()

    # ---- the memory high-water mark ----------------------------------------------------------

    def _arm_memory_mark(self) -> None:
        """At a cell's start (one pread): the mark is armed for it, unless the kernel already holds
        more than the mark that it cannot give back (big variables of an earlier cell): such a cell
        would be interrupted by whatever it allocates, even by `del big`, so it runs without the
        mark (and without memory.high's throttling), the OOM killer behind it as always."""
        current = self._cgroup.current()
        above = current is not None and current >= self._memory_high \
            and self._cgroup.pinned(current) >= self._memory_high
        self._mark_armed = not above
        if above != self._high_lifted:
            self._cgroup.set_high(None if above else self._memory_high)
            self._high_lifted = above

    def _on_memory_event(self, kernel: KernelProcess) -> None:
        """memory.events changed (the relay thread; rate-limited by the guest kernel to one per 10 ms).
        Above the mark with memory the guest cannot reclaim, during a cell: interrupt it."""
        try:
            while os.read(self._memory_watch, 4096):
                pass
        except OSError:  # drained (EAGAIN)
            pass
        if not self._mark_armed or self._memory_high is None:
            return
        cell = self.busy_with()
        current = self._cgroup.current()
        if cell is None or current is None or current < self._memory_high:
            return
        if self._cgroup.pinned(current) < self._memory_high:
            return  # page cache over the mark: the guest kernel reclaims it, nothing to stop
        self._mark_armed = False
        # No throttling from here on: the C call in progress (the interrupt lands after it) ends as
        # fast as it can, and if it runs into memory.max the OOM killer acts at once, not seconds later.
        self._cgroup.set_high(None)
        self._high_lifted = True
        note = {"msg_id": cell["msg_id"], "memory_current": current, "memory_max": self._limits.get("memory_max"),
                "memory_high": self._memory_high}
        try:
            tmp = self.paths.memory_note_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(note, f)
            os.replace(tmp, self.paths.memory_note_file)
        except OSError:
            pass  # the host still says MemoryLimitExceeded; the kernel shows a KeyboardInterrupt
        self._send(encode_control({"event": Event.memory_limit, "action": "interrupt", **note, "context": self.slot}))
        try:
            os.kill(kernel.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def _check_oom_kill(self, msg_id: str | None) -> None:
        """A cell that errs or ends: did the OOM killer kill one of its processes (the kernel lived)?"""
        if not self._cgroup_ok or self._cell_oom_reported:
            return
        if self._cgroup.counter("memory.events", "oom_kill") > self._cell_oom_kills:
            self._cell_oom_reported = True
            self._send(encode_control({
                "event": Event.memory_limit, "action": "oom_kill", "msg_id": msg_id,
                "memory_current": self._cgroup.current(), "memory_max": self._limits.get("memory_max"),
                "memory_high": self._memory_high, "context": self.slot}))

    def _maybe_cell_start(self, parts: list[bytes]) -> None:
        """The hot path: a bytes search in the header part, a JSON parse only if it may match."""
        for i, part in enumerate(parts):
            if part == b"<IDS|MSG>":
                if len(parts) > i + 2 and b'"execute_request"' in parts[i + 2]:
                    try:
                        header = json.loads(parts[i + 2])
                        if header.get("msg_type") == "execute_request":
                            self._note_cell_start()
                            self._note_busy(header)
                    except (ValueError, AttributeError):
                        pass
                return

    # ---- which cell the kernel is running ----------------------------------------------------

    def busy_with(self) -> dict | None:
        with self._busy_lock:
            return dict(self._busy[0]) if self._busy else None

    def _note_busy(self, header: dict) -> None:
        msg_id, session = header.get("msg_id"), header.get("session")
        if isinstance(msg_id, str):
            with self._busy_lock:
                self._busy.append({"msg_id": msg_id, "session": session if isinstance(session, str) else None})

    def _clear_busy(self) -> None:
        with self._busy_lock:
            self._busy.clear()

    def _maybe_cell_end(self, channel: Channel, parts: list[bytes]) -> None:
        """A kernel message going out: the execute_reply or the idle status of a tracked request
        ends it (whichever comes first). Bytes searches first: most messages are output."""
        if not self._busy:
            return
        for i, part in enumerate(parts):
            if part == b"<IDS|MSG>":
                if len(parts) < i + 6:
                    return
                header, parent, content = parts[i + 2], parts[i + 3], parts[i + 5]
                try:
                    if channel == Channel.IOPUB:
                        if b'"error"' in header and json.loads(header).get("msg_type") == "error":
                            msg_id = json.loads(parent).get("msg_id")
                            if self._busy and self._busy[0]["msg_id"] == msg_id:
                                self._check_oom_kill(msg_id)  # before the host sees the error
                            return
                        if not (b'"status"' in header and b'"idle"' in content
                                and json.loads(header).get("msg_type") == "status"
                                and json.loads(content).get("execution_state") == "idle"):
                            return
                    elif not (b'"execute_reply"' in header and json.loads(header).get("msg_type") == "execute_reply"):
                        return
                    msg_id = json.loads(parent).get("msg_id")
                except (ValueError, AttributeError):
                    return
                with self._busy_lock:
                    # The kernel answers in order: what was sent before this request is over too.
                    ended = any(cell["msg_id"] == msg_id for cell in self._busy)
                    if ended:
                        while self._busy.popleft()["msg_id"] != msg_id:
                            pass
                if ended:
                    self._check_oom_kill(msg_id)  # before the host sees the end
                return

    # ---- the relay thread ------------------------------------------------------------------

    def _start_relay(self, kernel: KernelProcess) -> None:
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_w = wake_w
        ready = threading.Event()
        self._relay = threading.Thread(target=self._relay_loop, args=(self._generation, kernel, wake_r, ready),
                                       name=f"kernel-relay-{self.slot}", daemon=True)
        self._relay.start()
        ready.wait(10)
        push = self._ctx.socket(zmq.PAIR)
        push.connect(self.paths.inbox + str(self._generation))
        with self._inbox_lock:
            self._inbox_push = push

    def _stop_relay(self) -> None:
        with self._inbox_lock:
            if self._inbox_push is not None:
                self._inbox_push.close(linger=0)
                self._inbox_push = None
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"q")
            except OSError:
                pass
        if self._relay is not None:
            self._relay.join(5)
            self._relay = None
        if self._wake_w is not None:
            os.close(self._wake_w)
            self._wake_w = None

    def _relay_loop(self, generation: int, kernel: KernelProcess, wake_r: int, ready: threading.Event) -> None:
        inbox = self._ctx.socket(zmq.PAIR)
        inbox.bind(self.paths.inbox + str(generation))
        sockets = {
            Channel.SHELL: self._ctx.socket(zmq.DEALER),
            Channel.KCONTROL: self._ctx.socket(zmq.DEALER),
            Channel.STDIN: self._ctx.socket(zmq.DEALER),
            Channel.IOPUB: self._ctx.socket(zmq.SUB),
        }
        addresses = {Channel.SHELL: "shell_port", Channel.KCONTROL: "control_port",
                     Channel.STDIN: "stdin_port", Channel.IOPUB: "iopub_port"}
        identity = f"vmcell-{generation}".encode()
        for channel, sock in sockets.items():
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 10)  # the kernel binds a moment after it starts
            if channel == Channel.IOPUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                sock.setsockopt(zmq.IDENTITY, identity)  # shell and stdin share one identity, as Jupyter expects
            sock.connect(self.paths.address(addresses[channel]))
        channel_of = {sock: channel for channel, sock in sockets.items()}
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        for sock in sockets.values():
            poller.register(sock, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        if kernel.pidfd is not None:
            poller.register(kernel.pidfd, zmq.POLLIN)
        if self._memory_watch is not None:
            poller.register(self._memory_watch, zmq.POLLIN)
        ready.set()

        def relay_out(events) -> None:
            for sock, channel in channel_of.items():
                if sock in events:
                    parts = sock.recv_multipart()
                    if channel in (Channel.IOPUB, Channel.SHELL):
                        # Before it goes out: a host that sees the cell's end then finds it in the status.
                        self._maybe_cell_end(channel, parts)
                    size = sum(len(p) for p in parts)
                    if size + 16 + 4 * len(parts) > MAX_FRAME_BYTES:
                        # Too big for one frame: tell the host what was dropped instead.
                        self._send(encode_control({"event": Event.dropped, "channel": channel.name, "bytes": size,
                                                   "context": self.slot}))
                    else:
                        self._send(encode_multipart(channel, parts, self.slot))

        try:
            while True:
                events = dict(poller.poll())  # no timeout: the pidfd and the wake pipe say when to stop
                if inbox in events:
                    message = inbox.recv_multipart()
                    channel = Channel(message[0][0])
                    target = sockets.get(channel)
                    if target is not None:
                        if channel == Channel.SHELL:
                            self._maybe_cell_start(message[1:])
                        target.send_multipart(message[1:])
                relay_out(events)
                if self._memory_watch is not None and self._memory_watch in events:
                    self._on_memory_event(kernel)
                if wake_r in events:
                    return  # a new kernel is starting: this relay is done
                if kernel.pidfd is not None and kernel.pidfd in events or kernel.pidfd is None:
                    deadline = time.monotonic() + DRAIN_S  # its last words, still in the sockets
                    while (remaining := deadline - time.monotonic()) > 0:
                        more = dict(poller.poll(remaining * 1000))
                        if wake_r in more:
                            return
                        relay_out(more)
                    kernel.exited.wait(EXIT_REPORT_WAIT_S)
                    if generation == self._generation:
                        self._clear_busy()  # its cell died with it
                        self._send(encode_control(self._died_event(kernel)))
                    return
        finally:
            for sock in (inbox, *sockets.values()):
                sock.close(linger=0)
            os.close(wake_r)

    def _died_event(self, kernel: KernelProcess) -> dict:
        oom = False
        if self._cgroup_ok and kernel.returncode in (None, -signal.SIGKILL):
            oom = self._cgroup.counter("memory.events", "oom_kill") > self._cell_oom_kills
        return {"event": Event.kernel_died, "returncode": kernel.returncode, "oom_killed": oom,
                "memory_max": self._limits.get("memory_max"), "context": self.slot}
