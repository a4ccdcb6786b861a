"""IPython extension loaded into the guest kernel: per-cell settings that travel as message data.

The host puts `{"vmcell": {...}}` in an execute_request's metadata. Before the cell runs we apply
it, after the cell we undo what was per-cell. Values are never spliced into code: an env value with
quotes and newlines arrives byte for byte.

  env: {name: value|null}   set (or unset, for null) for this cell only
  session_env: {...}        the same, kept after the cell (session-wide variables)
  reseed: true              reseed `random` and numpy's global RNG from the (fresh) kernel entropy
  output_cap: bytes         stdout/stderr kept per cell; the rest is dropped here, in the guest

The host enforces its own cap on whatever arrives (the guest is untrusted); the guest-side cap
keeps a runaway print from buffering hundreds of MiB into one message inside a 1 GiB VM.

A cell the agent interrupted at the kernel's memory high-water mark (kernel.py leaves a note naming
it) ends with MemoryLimitExceeded instead of a KeyboardInterrupt, and what its frames held is freed
(IPython keeps the last traceback, and with it every local of the interrupted frames, alive).

Chores for the process tree (kernel.py): a copy of the kernel made by os.fork() (multiprocessing,
a fork bomb) is the OOM killer's first choice in the kernel's cgroup and exits when its copy of the
cell ends, so a fork bomb loses children, not the kernel; before a cell, reap the children the agent's kill_children
killed (their zombies would count against the cgroup's pids.max); and, in a kernel
forked from the warm fork server (which imported matplotlib's inline backend without IPython),
hook the inline backend into this shell as importing it here would have.

Results as E2B's: charts of matplotlib figures, DataFrame data, JSON, PIL images (display.py).
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys

from . import lean_execute, lean_flush

REAP_FILE = "/run/vmcell/reap.json"  # written by the agent (kernel.py)
MEMORY_NOTE_FILE = "/run/vmcell/memory-interrupt.json"  # written by the agent (kernel.py)

_MISSING = object()
_saved: dict[str, object] = {}
# Past the host's cap by this much, so the host sees the overflow and marks the result truncated.
_CAP_MARGIN = 64 * 1024
_FLUSH_EVERY = 1024 * 1024  # keeps each stream message small


class _StreamBudget:
    def __init__(self) -> None:
        self.cap: int | None = None
        self.used = 0
        self.unflushed = 0

    def wrap(self, stream) -> None:
        write = stream.write

        def capped_write(text):
            if not isinstance(text, str) or self.cap is None:
                return write(text)
            room = self.cap + _CAP_MARGIN - self.used
            if room <= 0:
                return len(text)
            piece = text[:room]
            self.used += len(piece)
            self.unflushed += len(piece)
            write(piece)
            if self.unflushed >= _FLUSH_EVERY:
                self.unflushed = 0
                stream.flush()
            return len(text)

        stream.write = capped_write


_budget = _StreamBudget()


def _parent(ip) -> dict:
    kernel = getattr(ip, "kernel", None)
    if kernel is None:
        return {}
    try:
        parent = kernel.get_parent("shell")
    except TypeError:  # older ipykernel
        parent = kernel.get_parent()
    return parent or {}


def _request_settings(ip) -> dict:
    settings = _parent(ip).get("metadata", {}).get("vmcell")
    return settings if isinstance(settings, dict) else {}


class MemoryLimitExceeded(MemoryError):
    """The cell was interrupted at the kernel's memory high-water mark (shown, never raised)."""


def _mib(value) -> str:
    return f"{value / 2**20:.0f}" if isinstance(value, int) else "?"


def _take_memory_note(ip) -> dict | None:
    """The agent's note, if it is about this cell (any other is stale, and goes)."""
    taken = MEMORY_NOTE_FILE + ".taken"
    try:
        os.rename(MEMORY_NOTE_FILE, taken)
    except OSError:
        return None
    try:
        with open(taken) as f:
            note = json.load(f)
        os.unlink(taken)
    except (OSError, ValueError):
        return None
    msg_id = _parent(ip).get("header", {}).get("msg_id")
    return note if isinstance(note, dict) and msg_id and note.get("msg_id") == msg_id else None


def _on_keyboard_interrupt(ip, etype, value, tb, tb_offset=None):
    """IPython's custom handler for KeyboardInterrupt in user code: a plain one is shown as always."""
    note = _take_memory_note(ip)
    if note is None:
        ip.showtraceback((etype, value, tb), tb_offset=tb_offset)
        return None
    error = MemoryLimitExceeded(
        f"the kernel used {_mib(note.get('memory_current'))} MiB of its {_mib(note.get('memory_max'))} MiB limit "
        f"(high-water mark {_mib(note.get('memory_high'))} MiB); the cell was interrupted and its variables are kept")
    ip.showtraceback((MemoryLimitExceeded, error, tb), tb_offset=tb_offset)
    # ipykernel's execute_reply names the cell's error from the run's result: ours, not the interrupt.
    result = getattr(getattr(ip, "displayhook", None), "exec_result", None)
    if result is not None and getattr(result, "error_in_exec", None) is value:
        result.error_in_exec = error
    # What the interrupted frames held must go now, or the next cell starts at the mark: IPython
    # keeps the traceback (sys.last_*, its formatter's .tb, the exception in last_execution_result).
    # They are freed as IPython's run_code returns (its own locals hold the traceback until then);
    # post_execute collects whatever cycles remain.
    del tb
    exc, hops = value, 0
    while exc is not None and hops < 100:
        exc.__traceback__ = None
        exc, hops = exc.__context__ or exc.__cause__, hops + 1
    sys.last_traceback = None
    formatter = getattr(ip, "InteractiveTB", None)
    if formatter is not None and hasattr(formatter, "tb"):
        formatter.tb = None
    _memory_interrupted.append(True)
    return None


_memory_interrupted: list[bool] = []  # post_execute runs a gc pass after such a cell
_lean_flush: lean_flush.LeanFlush | None = None
_lean_execute: lean_execute.LeanExecute | None = None


def _apply(env: dict, remember: bool) -> None:
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            continue
        if remember and name not in _saved:
            _saved[name] = os.environ.get(name, _MISSING)
        if value is None:
            os.environ.pop(name, None)
        elif isinstance(value, str) and "\0" not in value:
            os.environ[name] = value


def reseed() -> None:
    random.seed(os.urandom(32))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def reap_killed_children() -> None:
    """Zombies of children the agent killed; a child still held by a live Popen is left for it to
    reap (so its returncode says -9). The gc scan runs only after a kill_children."""
    taken = REAP_FILE + ".taken"
    try:
        os.rename(REAP_FILE, taken)
    except OSError:
        return
    try:
        with open(taken) as f:
            pids = {int(p) for p in json.load(f)}
        os.unlink(taken)
    except (OSError, ValueError, TypeError):
        return
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None:
        pids -= {o.pid for o in gc.get_objects() if isinstance(o, subprocess.Popen) and o.returncode is None}
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _after_fork_in_child(ip, interrupts) -> None:
    """In a copy of the kernel made by os.fork() (multiprocessing's workers, a fork bomb): first in
    line for the OOM killer, and gone when its copy of the cell ends, with or without an error.
    Its sockets are the kernel's, so it could never serve as a kernel; without this a fork bomb's
    children each format a traceback (several MiB of copied pages) and then linger."""
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        os.write(fd, b"1000")
        os.close(fd)
    except OSError:
        pass
    interrupts.pending = False
    ip.showtraceback = _exit_forked_child


def _exit_forked_child(*args, **kwargs) -> None:
    os._exit(1)


class _Interrupts:
    """An interrupt must not vanish. Python runs os.fork()'s at-fork callbacks (IPython's history
    manager and logging have some) from C and swallows what they raise: a SIGINT that lands in one
    of them is printed as "Exception ignored" and lost. A cell forking in a loop spends nearly all
    its time in fork(), so its interrupts nearly always land there (measured: never stopped).
    A swallowed KeyboardInterrupt is therefore remembered and raised again: by os.fork() itself
    (wrapped here) as it returns, or, if no fork comes first, by re-interrupting the main thread
    a moment later from a helper thread."""

    def __init__(self, kernel_pid: int):
        self.kernel_pid = kernel_pid
        self.pending = False
        self.default_hook = sys.unraisablehook
        self.real_fork = os.fork

    def install(self) -> None:
        sys.unraisablehook = self.unraisable
        os.fork = self.fork

    def fork(self) -> int:
        self.raise_pending()
        pid = self.real_fork()
        if pid:
            self.raise_pending()  # swallowed in an after-fork callback just now
        return pid

    def raise_pending(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def unraisable(self, unraisable) -> None:
        if unraisable.exc_type is not KeyboardInterrupt or os.getpid() != self.kernel_pid:
            self.default_hook(unraisable)
            return
        self.pending = True
        import _thread

        try:
            _thread.start_new_thread(self._later, ())
        except RuntimeError:  # no thread to spare (the task limit): the next fork raises it
            pass

    def _later(self) -> None:
        import _thread
        import time

        time.sleep(0.005)
        if self.pending:
            self.pending = False
            _thread.interrupt_main()


def _inline_backend_integration() -> None:
    backend = sys.modules.get("matplotlib_inline.backend_inline")
    if backend is not None and hasattr(backend, "_enable_matplotlib_integration"):
        try:
            backend._enable_matplotlib_integration()
        except Exception as exc:  # plots still work through plt.show(); say why auto-display may not
            print(f"vmcell: inline matplotlib integration failed: {exc!r}", file=sys.__stderr__)


def load_ipython_extension(ip) -> None:
    # A code context's kernel has its own directory (kernel.py's KernelPaths): read once, at load.
    global REAP_FILE, MEMORY_NOTE_FILE
    run_dir = os.environ.get("VMCELL_RUN_DIR")
    if run_dir:
        REAP_FILE, MEMORY_NOTE_FILE = f"{run_dir}/reap.json", f"{run_dir}/memory-interrupt.json"
    # pre/post_execute, not pre/post_run_cell: those skip silent cells, and the host's setup cells are silent.
    def pre_execute() -> None:
        reap_killed_children()
        settings = _request_settings(ip)
        cap = settings.get("output_cap")
        _budget.cap = cap if isinstance(cap, int) and cap > 0 else None
        _budget.used = _budget.unflushed = 0
        if not settings:
            return
        if isinstance(settings.get("session_env"), dict):
            _apply(settings["session_env"], remember=False)
        if isinstance(settings.get("env"), dict):
            _apply(settings["env"], remember=True)
        if settings.get("reseed"):
            reseed()

    kernel_pid = os.getpid()

    def post_execute() -> None:
        if os.getpid() != kernel_pid:  # a forked copy reached the end of its cell (see _after_fork_in_child)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if _memory_interrupted:
            _memory_interrupted.clear()
            gc.collect()
        while _saved:
            name, old = _saved.popitem()
            if old is _MISSING:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

    for stream in (sys.stdout, sys.stderr):
        _budget.wrap(stream)
    global _lean_flush, _lean_execute
    _lean_flush = lean_flush.install()  # no thread round trip for a flush that has nothing to do
    _lean_execute = lean_execute.install(ip)  # each cell transformed once, not twice
    ip.events.register("pre_execute", pre_execute)
    ip.events.register("post_execute", post_execute)
    ip.set_custom_exc((KeyboardInterrupt,), _on_keyboard_interrupt)
    interrupts = _Interrupts(kernel_pid)
    interrupts.install()
    os.register_at_fork(after_in_child=lambda: _after_fork_in_child(ip, interrupts))
    _inline_backend_integration()
    _register_display(ip)


def _register_display(ip) -> None:
    """Charts, DataFrame data, JSON and PIL images in results, as E2B's (display.py)."""
    try:
        from . import display

        display.register(ip)
    except Exception as exc:  # results keep their standard MIME types
        print(f"vmcell: result extras unavailable: {exc!r}", file=sys.__stderr__)
