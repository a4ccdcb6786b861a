"""The guest agent: the guest end of the link.

It owns the virtio-serial port, answers control requests (docs/link-protocol.md) and, from the
kernel-bridge issue on, relays Jupyter messages. Threads, not asyncio: one reader thread owns the
port, replies go out under a lock, slow requests run on their own threads so ping stays instant.
"""

from __future__ import annotations

import base64
import fcntl
import glob
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable

from . import __version__, fsops, metrics
from .commands import Commands
from .ops import INLINE_OPS, ErrorKind, Op, OpError
from .watch import Watches
from .wire import (
    AGENT_PORT_NAME,
    HOST_RESYNC_MAGIC,
    PROTOCOL_VERSION,
    Channel,
    FrameDecoder,
    ProtocolError,
    decode_control,
    decode_multipart,
    encode_control,
    is_sync_nonce,
    sync_marker,
)

RUN_OUTPUT_CAP = 1024 * 1024  # per stream, for the `run` op
FILE_CAP = 16 * 1024 * 1024  # per file transfer: base64 of it must fit one frame with room to spare
LIST_CAP = 10_000  # entries per directory listing
HOME = "/root"
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
OOM_SCORE_ADJ = -900  # the kernel (reset to 0) is the OOM killer's choice, not the agent
# OSErrors that are the caller's mistake, said plainly; any other exception is an Internal error.
OS_ERROR_KINDS = (
    (FileNotFoundError, ErrorKind.NotFound),
    (IsADirectoryError, ErrorKind.IsADirectory),
    (NotADirectoryError, ErrorKind.NotADirectory),
    (PermissionError, ErrorKind.PermissionDenied),
)


def log(message: str) -> None:
    print(f"vmcell-agent: {message}", file=sys.stderr, flush=True)


def find_port(name: str = AGENT_PORT_NAME, wait_s: float = 30.0) -> str:
    """No udev in the guest: look the port up by name in sysfs."""
    deadline = time.monotonic() + wait_s
    while True:
        for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
            with open(name_file) as f:
                if f.read().strip() == name:
                    return "/dev/" + os.path.basename(os.path.dirname(name_file))
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {name!r} not found")
        time.sleep(0.05)


class Port:
    """The virtio-serial port. Reads return b'' while no host is connected (writes block meanwhile)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self._write_lock = threading.Lock()

    def read(self) -> bytes:
        """What the host sent, or b'' if no host is connected (or it just left)."""
        return os.read(self.fd, 1 << 20)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        with self._write_lock:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]


# ---- control operations -----------------------------------------------------------------------


def op_hello(args: dict) -> dict:
    """The answer goes out right after the sync marker (Agent.handle_control), whatever it is."""
    version = args.get("version")
    if version != PROTOCOL_VERSION:
        raise OpError(ErrorKind.VersionMismatch, f"host speaks link protocol {version!r}, agent speaks {PROTOCOL_VERSION}")
    if not is_sync_nonce(args.get("sync")):
        raise OpError(ErrorKind.BadRequest, "hello needs a sync nonce of 32 lowercase hex digits")
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    return {"version": PROTOCOL_VERSION, "agent": __version__, "boot_id": boot_id, "pid": os.getpid()}


def op_ping(args: dict) -> dict:
    return {"monotonic_ns": time.monotonic_ns()}


def op_identity(args: dict) -> dict:
    """A restored snapshot is a clone: give it its own entropy, clock, hostname and machine-id."""
    entropy = _b64(args, "entropy")
    if not 16 <= len(entropy) <= 512:
        raise OpError(ErrorKind.BadRequest, "entropy must be 16..512 bytes")
    with open("/dev/urandom", "wb", buffering=0) as rnd:
        fcntl.ioctl(rnd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
        fcntl.ioctl(rnd, RNDRESEEDCRNG)
    time.clock_settime_ns(time.CLOCK_REALTIME, _arg(args, "time_ns", int))
    hostname = _arg(args, "hostname", str)
    socket.sethostname(hostname)
    machine_id = _arg(args, "machine_id", str)
    if len(machine_id) != 32 or any(c not in "0123456789abcdef" for c in machine_id):
        raise OpError(ErrorKind.BadRequest, "machine_id must be 32 lowercase hex digits")
    for path, text in (("/etc/hostname", hostname), ("/etc/machine-id", machine_id)):
        with open(path, "w") as f:
            f.write(text + "\n")
    return {}


def op_clock(args: dict) -> dict:
    """After a pause (the VM stood still, and so did its clock): the host's time, and how far off we were."""
    host_ns = _arg(args, "time_ns", int)
    offset_ms = (time.time_ns() - host_ns) / 1e6
    time.clock_settime_ns(time.CLOCK_REALTIME, host_ns)
    return {"offset_ms": offset_ms}


def op_run(args: dict) -> dict:
    """Run a program in the guest (the host's tools and tests use this; user code goes to the kernel)."""
    argv = _arg(args, "argv", list)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise OpError(ErrorKind.BadRequest, "argv must be a non-empty list of strings")
    timeout = _number(args, "timeout", 30.0)
    env = dict(os.environ, **_str_map(args, "env"))
    cwd = args.get("cwd") or "/root"
    if not isinstance(cwd, str):
        raise OpError(ErrorKind.BadRequest, "cwd must be a string")
    stdin = _b64(args, "stdin", required=False)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cwd, env=env, start_new_session=True,
        )
    except OSError as exc:
        raise OpError(ErrorKind.SpawnFailed, str(exc)) from None
    out: dict[str, bytes] = {}
    truncated = []

    def drain(name, stream):
        chunks, size = [], 0
        for chunk in iter(lambda: stream.read(65536), b""):
            if size < RUN_OUTPUT_CAP:
                chunks.append(chunk[: RUN_OUTPUT_CAP - size])
            size += len(chunk)
        if size > RUN_OUTPUT_CAP:
            truncated.append(name)
        out[name] = b"".join(chunks)

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for t in readers:
        t.join()
    return {
        "returncode": proc.returncode,
        "stdout": base64.b64encode(out["stdout"]).decode(),
        "stderr": base64.b64encode(out["stderr"]).decode(),
        "truncated": truncated,
        "timed_out": timed_out,
    }


def _guest_path(args: dict) -> str:
    path = _arg(args, "path", str)
    if not path or "\0" in path:
        raise OpError(ErrorKind.BadRequest, "path must be a non-empty string")
    return os.path.normpath(os.path.join(HOME, path))  # relative paths are relative to the home directory


def op_files_write(args: dict) -> dict:
    path = _guest_path(args)
    data = _b64(args, "data")
    if len(data) > FILE_CAP:
        raise OpError(ErrorKind.TooLarge, f"files are limited to {FILE_CAP} bytes per transfer")
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"path": path, "size": len(data)}


def op_files_read(args: dict) -> dict:
    path = _guest_path(args)
    size = os.stat(path).st_size
    if size > FILE_CAP:
        raise OpError(ErrorKind.TooLarge, f"{path} is {size} bytes; transfers are limited to {FILE_CAP}")
    with open(path, "rb") as f:
        return {"path": path, "data": base64.b64encode(f.read()).decode()}


def op_files_list(args: dict) -> dict:
    path = _guest_path(args)
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            if len(entries) >= LIST_CAP:
                break
            st = entry.stat(follow_symlinks=False)
            kind = "dir" if entry.is_dir(follow_symlinks=False) else "file" if entry.is_file(follow_symlinks=False) else "other"
            entries.append({"name": entry.name, "path": os.path.join(path, entry.name), "type": kind, "size": st.st_size})
    entries.sort(key=lambda e: e["name"])
    return {"path": path, "entries": entries}


def op_sync(args: dict) -> dict:
    """Before a snapshot: flush dirty data, and optionally drop clean caches so the snapshot is smaller."""
    os.sync()
    if args.get("drop_caches"):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    return {}


def op_poweroff(args: dict) -> dict:
    threading.Timer(0.05, os.kill, (1, signal.SIGTERM)).start()
    return {}


def op_egress(args: dict) -> dict:
    """Network for this session: the host's proxy over the egress port (egress.py)."""
    from . import egress

    nonce = args.get("sync")
    if not is_sync_nonce(nonce):
        raise OpError(ErrorKind.BadRequest, "egress needs a sync nonce of 32 lowercase hex digits")
    return egress.enable(nonce)


def _context(args: dict) -> int:
    """The `context` argument of a kernel op: a slot, 0 (the default kernel) when absent."""
    from .wire import MAX_CONTEXT_SLOT

    slot = args.get("context", 0)
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= MAX_CONTEXT_SLOT:
        raise OpError(ErrorKind.BadRequest, f"context must be an integer in 0..{MAX_CONTEXT_SLOT}")
    return slot


def kernel_ops(kernels) -> dict[Op, Callable[[dict], dict]]:
    """The kernel ops; `kernels(slot, create=None)` is the slot's relay (NoKernel if it has none);
    `create` (language, cwd): a new context's relay is made for kernel_start."""
    from .kernel import LANGUAGES

    def start(args: dict) -> dict:
        key = _arg(args, "key", str)
        env = _str_map(args, "env")
        preload = args.get("preload") or []
        if not isinstance(preload, list) or not all(isinstance(m, str) and _MODULE_NAME.match(m) for m in preload):
            raise OpError(ErrorKind.BadRequest, "preload must be a list of module names")
        limits = args.get("limits") or {}
        if not isinstance(limits, dict):
            raise OpError(ErrorKind.BadRequest, "limits must be an object")
        checked = {}
        for name, low, high in (("pids_max", 16, 1 << 22), ("memory_reserve_mib", 0, 1 << 20),
                                ("memory_margin_mib", 0, 1 << 20)):
            if name in limits:
                value = limits[name]
                if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                    raise OpError(ErrorKind.BadRequest, f"limits.{name} must be an integer in {low}..{high}")
                checked[name] = value
        mode = args.get("mode", "fork")
        if mode not in ("fork", "exec"):
            raise OpError(ErrorKind.BadRequest, "mode must be 'fork' or 'exec'")
        language = args.get("language", "python")
        if language not in LANGUAGES:
            raise OpError(ErrorKind.BadRequest, f"language must be one of {', '.join(LANGUAGES)}")
        cwd = args.get("cwd", HOME)
        if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd or len(cwd) > 4096:
            raise OpError(ErrorKind.BadRequest, "cwd must be an absolute path")
        if not os.path.isdir(cwd):
            try:
                os.makedirs(cwd)
            except OSError as exc:
                raise OpError(ErrorKind.BadRequest, f"cwd {cwd!r} is not a directory and cannot be made: "
                                                    f"{exc.strerror}") from None
        relay = kernels(_context(args), create=(language, cwd))
        relay.language, relay.cwd = language, cwd
        return relay.start(key, env, preload, checked, mode)

    def kill_children(args: dict) -> dict:
        everything = args.get("all", False)
        if not isinstance(everything, bool):
            raise OpError(ErrorKind.BadRequest, "all must be a boolean")
        return kernels(_context(args)).kill_children(everything)

    def stop(args: dict) -> dict:
        slot = _context(args)
        if slot == 0:
            raise OpError(ErrorKind.BadRequest, "the default kernel (context 0) cannot be stopped")
        return kernels(slot).stop()

    return {
        Op.kernel_start: start,
        Op.kernel_interrupt: lambda args: kernels(_context(args)).interrupt(),
        Op.kernel_kill_children: kill_children,
        Op.kernel_status: lambda args: kernels(_context(args)).status(),
        Op.kernel_stop: stop,
    }


OPS: dict[Op, Callable[[dict], dict]] = {
    Op.hello: op_hello,
    Op.ping: op_ping,
    Op.identity: op_identity,
    Op.clock: op_clock,
    Op.run: op_run,
    Op.sync: op_sync,
    Op.poweroff: op_poweroff,
    Op.files_write: op_files_write,
    Op.files_read: op_files_read,
    Op.files_list: op_files_list,
    Op.egress: op_egress,
    **fsops.OPS,
    Op.metrics: metrics.op_metrics,
}


def _arg(args: dict, name: str, kind: type):
    value = args.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise OpError(ErrorKind.BadRequest, f"argument {name!r} must be {kind.__name__}")
    return value


def _b64(args: dict, name: str, required: bool = True) -> bytes:
    value = args.get(name, None if required else "")
    if not isinstance(value, str):
        raise OpError(ErrorKind.BadRequest, f"argument {name!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise OpError(ErrorKind.BadRequest, f"argument {name!r} is not valid base64") from None


def _number(args: dict, name: str, default: float) -> float:
    value = args.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e7:
        raise OpError(ErrorKind.BadRequest, f"argument {name!r} must be a positive number")
    return float(value)


def _str_map(args: dict, name: str) -> dict[str, str]:
    value = args.get(name) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise OpError(ErrorKind.BadRequest, f"argument {name!r} must map strings to strings")
    return value


def surface_ops(commands: Commands, watches: Watches) -> dict[Op, Callable[[dict], dict]]:
    return {Op.command_start: commands.start, Op.command_kill: commands.kill,
            Op.files_watch: watches.start, Op.files_unwatch: watches.stop}


# ---- main loop --------------------------------------------------------------------------------


class Agent:
    def __init__(self, port: Port):
        from .kernel import KernelRelay  # needs pyzmq: imported here so the link works without it

        self.port = port
        self.relay = KernelRelay(port.write)  # slot 0: the default kernel; code contexts share its fork server
        self._relay_class = KernelRelay
        self._relays_lock = threading.Lock()
        self.commands, self.watches = Commands(port.write), Watches(port.write)
        self.ops = {**OPS, **kernel_ops(self.kernels), **surface_ops(self.commands, self.watches)}

    def kernels(self, slot: int, create: tuple[str, str] | None = None):
        """The relay of a slot (0: the default kernel's); `create` (language, cwd) makes a context's."""
        relays = self.relay._share.relays
        with self._relays_lock:
            relay = relays.get(slot)
            if relay is None and create is not None:
                relay = self._relay_class(self.port.write, slot, self.relay._share, *create)
        if relay is None:
            raise OpError(ErrorKind.NoKernel, f"no code context {slot}")
        return relay

    def forward(self, frame) -> None:
        relay = self.relay._share.relays.get(frame.slot)
        if relay is None:
            raise RuntimeError(f"no code context {frame.slot}")
        relay.forward(frame.channel, decode_multipart(frame.body))

    def reply(self, request_id, ok: bool, payload: dict, prefix: bytes = b"") -> None:
        """`prefix` (hello's sync marker) goes out in the same write, under the port's lock: nothing
        else can come between it and the reply, and it never lands inside another frame."""
        key = "result" if ok else "error"
        self.port.write(prefix + encode_control({"id": request_id, "ok": ok, key: payload}))

    def fail(self, request_id, kind: ErrorKind, message: str, prefix: bytes = b"") -> None:
        self.reply(request_id, False, {"type": kind, "message": message}, prefix)

    def handle_control(self, message: dict) -> None:
        request_id, name = message.get("id"), message.get("op")
        try:
            op = Op(name)
        except ValueError:
            self.fail(request_id, ErrorKind.UnknownOp, f"unknown op {name!r}")
            return
        fn = self.ops[op]
        args = message.get("args")
        args = {} if args is None else args
        prefix = b""
        if op == Op.hello and isinstance(args, dict) and is_sync_nonce(args.get("sync")):
            # The host drops everything until this marker (the rest of a frame a previous host or a
            # snapshot cut in half): it must precede the answer, a VersionMismatch included.
            prefix = sync_marker(args["sync"])
        if op in INLINE_OPS:
            self._call(request_id, fn, args, prefix)
        else:
            threading.Thread(target=self._call, args=(request_id, fn, args), name=f"op-{op.value}", daemon=True).start()

    def _call(self, request_id, fn, args, prefix: bytes = b"") -> None:
        try:
            if not isinstance(args, dict):
                raise OpError(ErrorKind.BadRequest, "args must be an object")
            result = fn(args)
        except OpError as exc:
            self.fail(request_id, exc.kind, str(exc), prefix)
        except OSError as exc:
            kind = next((k for t, k in OS_ERROR_KINDS if isinstance(exc, t)), None)
            if kind is None:
                self.fail(request_id, ErrorKind.Internal, f"{type(exc).__name__}: {exc}", prefix)
            else:
                self.fail(request_id, kind, f"{exc.strerror}: {exc.filename}", prefix)
        except Exception as exc:  # an op's bug must not take the agent down
            self.fail(request_id, ErrorKind.Internal, f"{type(exc).__name__}: {exc}", prefix)
        else:
            self.reply(request_id, True, result, prefix)

    def serve(self) -> None:
        # Every host connection starts with the resync magic: the decoder drops whatever came before
        # it (half a frame of a host that died, or of a snapshot taken mid-frame) and starts afresh.
        decoder = FrameDecoder(resync=HOST_RESYNC_MAGIC)
        connected = True
        while True:
            data = self.port.read()
            if not data:
                # No host (or it just left): what it half sent is not coming. Poll until one connects.
                if connected and decoder.buffered:
                    log(f"host disconnected: dropping {decoder.buffered} bytes of a partial frame")
                decoder.reset()
                connected = False
                time.sleep(0.02)
                continue
            connected = True
            errors = decoder.errors
            frames = decoder.feed(data)
            if decoder.errors != errors:
                # The host is trusted, but a torn connection can leave junk: wait for its next magic.
                log(f"dropping link input until the host's next resync: {decoder.last_error}")
            for frame in frames:
                try:
                    if frame.channel == Channel.CONTROL:
                        self.handle_control(decode_control(frame.body))
                    else:
                        self.forward(frame)
                except (ProtocolError, RuntimeError) as exc:
                    log(f"dropped a {frame.channel.name} frame: {exc}")


def main() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass
    path = find_port()
    log(f"serving on {path}")
    Agent(Port(path)).serve()


if __name__ == "__main__":
    main()
