"""The warm fork server: kernels start from a process that has already imported everything.

A fresh `python -m ipykernel_launcher` spends seconds under TCG importing ipykernel, IPython, zmq,
tornado (and the kernel's first plot as long again importing matplotlib). The agent starts this
process once, on the first kernel_start (so it is part of the template snapshot): it imports the
kernel's modules and the template's preload list, warms a few code paths without IPython, and then
forks each kernel. A forked child calls setsid, moves itself into the kernel's cgroup, takes the
kernel's env, chdirs to /root, and runs IPKernelApp with the same arguments as the exec path.

Rules that make forking safe: the server is single-threaded and holds no zmq context (it never
creates one: zmq is imported, not used). OpenBLAS starts its thread pool when numpy loads, but
registers a pthread_atfork handler that stops the pool before each fork (the child restarts it on
its first BLAS call); the server checks it has one thread before forking and says so if not.
`gc.freeze()` before the fork keeps the child's collector from touching (copying) the server's
objects.

The server is the kernels' parent: it reaps them (a pidfd per child, no SIGCHLD handler) and
reports each exit to the agent. When the agent goes away (EOF on the socket) it kills the kernel
cgroup and exits.

Wire: a SOCK_SEQPACKET socketpair, one JSON object per message.
  agent -> server  {"id", "op": "preload", "modules": [...]}   -> {"id", "imported", "failed", "seconds"}
                   {"id", "op": "spawn", "argv", "env", "cwd", "cgroup", "preload", "kernel"?: "python"|"bash"}
                                                                -> {"id", "pid"} | {"id", "error"}
                   {"id", "op": "status"}                       -> {"id", "pid", "imported", "failed", "threads"}
  server -> agent  {"event": "ready", "pid", "seconds"}         once the base modules are imported
                   {"event": "exit", "pid", "returncode"}       a kernel exited (negative: killed by a signal)
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# What a started kernel has imported (ipykernel 6.29 / IPython 9): importing it here is the
# point of this process. Missing ones are skipped (the kernel imports what it needs itself).
BASE_MODULES = (
    "zmq", "tornado.ioloop", "jupyter_client.session", "traitlets",
    "IPython", "IPython.core.interactiveshell", "IPython.core.completer", "IPython.core.magics",
    "IPython.core.ultratb", "IPython.core.debugger", "IPython.core.oinspect", "IPython.core.completerlib",
    "IPython.extensions.storemagic", "IPython.utils.wildcard", "faulthandler", "tornado.platform.asyncio",
    "ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.iostream",
    "ipykernel.heartbeat", "ipykernel.control", "ipykernel.debugger", "ipykernel.comm",
    "ipykernel.eventloops", "ipykernel.parentpoller", "ipykernel.displayhook", "ipykernel.compiler",
    "vmcell_guest.ipython_ext", "vmcell_guest.cgroup",
    "vmcell_guest.bashkernel",  # bash code contexts (bash_kernel, pexpect)
)
MAX_MESSAGE = 1 << 20
OOM_SCORE_ADJ = -900  # prefer the kernel as the OOM victim; the kernel resets its own to 0


def log(message: str) -> None:
    print(f"vmcell-forkserver: {message}", file=sys.stderr, flush=True)


def _set_oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


# ---- the server -------------------------------------------------------------------------------


class Server:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.imported: list[str] = []
        self.failed: dict[str, str] = {}
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        spec = importlib.util.find_spec("ipykernel_launcher")
        self.launcher = spec.origin if spec and spec.origin else "ipykernel_launcher"

    def send(self, message: dict) -> None:
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError:
            pass  # the agent is gone; the next recv sees EOF

    # ---- imports ---------------------------------------------------------------------------

    def import_modules(self, names) -> None:
        before = len(self.imported)
        for name in names:
            if name in self.imported or name in self.failed:
                continue
            try:
                importlib.import_module(name)
            except BaseException as exc:  # a preload must never take the server down
                self.failed[name] = f"{type(exc).__name__}: {exc}"
                log(f"preload {name}: {self.failed[name]}")
            else:
                self.imported.append(name)
        if len(self.imported) > before:
            _warm()
            gc.collect()  # once per import batch, not per fork: a full collection costs ~0.3 s under TCG

    # ---- requests --------------------------------------------------------------------------

    def handle(self, message: dict) -> None:
        op, rid = message.get("op"), message.get("id")
        if op == "preload":
            start = time.monotonic()
            self.import_modules(message.get("modules") or [])
            self.send({"id": rid, "imported": self.imported, "failed": self.failed,
                       "seconds": round(time.monotonic() - start, 3)})
        elif op == "spawn":
            try:
                self.import_modules(message.get("preload") or [])
                pid = self.spawn(message)
            except Exception as exc:
                self.send({"id": rid, "error": f"{type(exc).__name__}: {exc}"})
            else:
                self.send({"id": rid, "pid": pid})
        elif op == "status":
            self.send({"id": rid, "pid": os.getpid(), "imported": self.imported, "failed": self.failed,
                       "threads": _thread_count(), "children": sorted(self.children.values())})
        else:
            self.send({"id": rid, "error": f"unknown op {op!r}"})

    def spawn(self, request: dict) -> int:
        if threading.active_count() != 1:  # native threads (OpenBLAS's pool) stop in their atfork handlers
            log(f"forking with {threading.active_count()} Python threads")
        cgroup_path = request.get("cgroup")
        gc.freeze()
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                _child(self, request)  # never returns
        finally:
            if pid != 0:
                gc.unfreeze()
        if cgroup_path:  # the child moves itself first thing; this makes sure before we answer
            try:
                with open(f"{cgroup_path}/cgroup.procs", "w") as f:
                    f.write(str(pid))
            except OSError as exc:
                log(f"cannot move kernel {pid} into {cgroup_path}: {exc}")
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        return pid

    def reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            returncode = None
        self.send({"event": "exit", "pid": pid, "returncode": returncode})

    def serve(self) -> None:
        while True:
            for fd, _ in self.poller.poll():
                if fd in self.children:
                    self.reap(fd)
                    continue
                try:
                    data = self.sock.recv(MAX_MESSAGE)
                except OSError:
                    data = b""
                if not data:
                    self.shutdown()
                try:
                    message = json.loads(data)
                except ValueError:
                    log("dropped a malformed request")
                    continue
                if isinstance(message, dict):
                    self.handle(message)

    def shutdown(self) -> None:
        """The agent is gone: its kernels go too (a new agent starts from scratch)."""
        from .cgroup import KernelCgroup

        log("agent gone: killing the kernel cgroups and exiting")
        import glob

        for path in [None, *glob.glob("/sys/fs/cgroup/kernel-*")]:  # the default kernel's, the contexts'
            try:
                (KernelCgroup() if path is None else KernelCgroup(path)).kill_all(timeout=5)
            except OSError:
                pass
        for pid in self.children.values():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        os._exit(0)


def _warm() -> None:
    """Code paths worth running once before forking, without IPython (best effort)."""
    modules = sys.modules
    try:
        if "matplotlib" in modules and "matplotlib.figure" not in _warmed:
            import io

            from matplotlib.figure import Figure

            fig = Figure(figsize=(4, 3))
            ax = fig.subplots()
            ax.plot([1, 2, 3], label="warm")
            ax.set_title("warm")
            ax.legend()
            fig.savefig(io.BytesIO(), format="png")
            _warmed.add("matplotlib.figure")
        if "pandas" in modules and "pandas" not in _warmed:
            frame = modules["pandas"].DataFrame({"a": [1, 2], "b": [0.5, 1.5]})
            frame._repr_html_()
            repr(frame)
            _warmed.add("pandas")
        if "IPython.core.ultratb" in modules and "ultratb" not in _warmed:
            _warmed.add("ultratb")
            from IPython.core.ultratb import AutoFormattedTB

            try:
                json.loads("{")
            except ValueError:
                # The kernel's theme: each theme caches its pygments formatter (~0.1 s to build).
                AutoFormattedTB(mode="Context", theme_name="neutral").structured_traceback(*sys.exc_info())
        # inspect.getmodule() maps files to modules through a cache it fills from sys.modules on a
        # miss (a realpath() per module: ~0.6 s for ~600 modules under TCG, paid by a kernel's
        # first traceback). Fill it after every import batch: a forked kernel inherits it.
        import inspect

        inspect.getmodule(compile("0", "<vmcell-warm>", "eval"))
    except Exception as exc:
        log(f"warm-up: {type(exc).__name__}: {exc}")


_warmed: set[str] = set()


# ---- the child: becomes the kernel ------------------------------------------------------------


def _child(server: Server, request: dict) -> None:
    code = 1
    try:
        os.setsid()
        cgroup_path = request.get("cgroup")
        if cgroup_path:
            with open(f"{cgroup_path}/cgroup.procs", "w") as f:
                f.write("0")  # 0: the writing process
        _set_oom_score_adj(0)
        server.sock.close()
        for pidfd in server.children:
            os.close(pidfd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        cwd = request.get("cwd") or "/root"
        os.chdir(cwd)
        os.environ.update(request.get("env") or {})
        argv = [str(a) for a in request.get("argv") or []]
        sys.argv = [server.launcher, *argv]  # sys.path[0] is /root already: the server runs there
        numpy = sys.modules.get("numpy")
        if numpy is not None:  # `random` reseeds itself after a fork; numpy's global RNG does not
            numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
        gc.unfreeze()
        from ipykernel.kernelapp import IPKernelApp

        if request.get("kernel") == "bash":  # a bash code context (bashkernel.py)
            from .bashkernel import VmcellBashKernel

            IPKernelApp.launch_instance(argv=argv, kernel_class=VmcellBashKernel)
            raise SystemExit(0)

        profile = os.environ.pop("VMCELL_KERNEL_PROFILE", "")  # a path: where to write where the start goes
        if profile:
            import cProfile
            import pstats

            app = IPKernelApp.instance()
            had = set(sys.modules)
            profiler = cProfile.Profile()
            profiler.enable()
            app.initialize(argv)
            profiler.disable()
            with open(profile, "w") as f:
                print("imported while starting:", sorted(set(sys.modules) - had), file=f)
                pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(80)
            app.start()
        else:
            IPKernelApp.launch_instance(argv=argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    os.environ.setdefault("MPLBACKEND", INLINE_BACKEND)  # before matplotlib loads: kernels plot inline
    _set_oom_score_adj(OOM_SCORE_ADJ)
    start = time.monotonic()
    server = Server(sock)
    server.import_modules(BASE_MODULES)
    server.send({"event": "ready", "pid": os.getpid(), "seconds": round(time.monotonic() - start, 3),
                 "imported": server.imported, "failed": server.failed})
    server.serve()


# ---- the agent's end --------------------------------------------------------------------------


class ForkServerError(Exception):
    pass


class ForkServerClient:
    """Starts the fork server and talks to it. Replies are matched by id; exits go to `on_exit`
    (called on this client's reader thread: it must not block)."""

    def __init__(self, on_exit: Callable[[int, int | None], None], on_gone: Callable[[], None] | None = None):
        self.on_exit = on_exit
        self.on_gone = on_gone
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vmcell_guest.forkserver", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/root", start_new_session=True,
        )
        theirs.close()
        self.pid = self._proc.pid
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting: dict[int, list] = {}  # id -> [event, reply]
        self._ready = threading.Event()
        self.ready_info: dict = {}
        self.alive = True
        threading.Thread(target=self._reader, name="forkserver-reader", daemon=True).start()

    def wait_ready(self, timeout: float) -> dict:
        if not self._ready.wait(timeout):
            raise ForkServerError(f"the fork server did not start within {timeout:g}s")
        if not self.alive:
            raise ForkServerError("the fork server exited while starting")
        return self.ready_info

    def request(self, message: dict, timeout: float) -> dict:
        with self._lock:
            if not self.alive:
                raise ForkServerError("the fork server is not running")
            self._next_id += 1
            rid = self._next_id
            slot = [threading.Event(), None]
            self._waiting[rid] = slot
        try:
            self._sock.send(json.dumps({**message, "id": rid}).encode())
            if not slot[0].wait(timeout):
                raise ForkServerError(f"no answer to {message.get('op')!r} from the fork server within {timeout:g}s")
        except OSError as exc:
            raise ForkServerError(f"fork server link: {exc}") from None
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
        reply = slot[1]
        if reply is None:
            raise ForkServerError("the fork server exited")
        if "error" in reply:
            raise ForkServerError(str(reply["error"]))
        return reply

    def _reader(self) -> None:
        try:
            while True:
                data = self._sock.recv(MAX_MESSAGE)
                if not data:
                    break
                message = json.loads(data)
                if message.get("event") == "exit":
                    self.on_exit(int(message["pid"]), message.get("returncode"))
                elif message.get("event") == "ready":
                    self.ready_info = message
                    self._ready.set()
                else:
                    with self._lock:
                        slot = self._waiting.get(message.get("id"))
                    if slot is not None:
                        slot[1] = message
                        slot[0].set()
        except (OSError, ValueError) as exc:
            log(f"fork server link failed: {exc}")
        with self._lock:
            self.alive = False
            for slot in self._waiting.values():
                slot[0].set()
        self._ready.set()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        log(f"fork server exited (status {self._proc.returncode})")
        if self.on_gone is not None:
            self.on_gone()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


if __name__ == "__main__":
    main()
