"""Every agent operation, event and error kind, listed once for the guest agent and the host.

Control requests are `{"id", "op", "args"}`; replies `{"id", "ok": true, "result"}` or
`{"id", "ok": false, "error": {"type": ErrorKind, "message"}}`; events `{"event": Event, ...}`.
docs/link-protocol.md describes each one.
"""

from __future__ import annotations

import enum


class Op(str, enum.Enum):
    HELLO = "hello"  # {version} -> {version, agent, boot_id, pid}
    PING = "ping"  # {} -> {monotonic_ns}
    IDENTITY = "identity"  # {entropy (b64), time_ns, hostname, machine_id} -> {}
    RUN = "run"  # {argv, timeout, stdin (b64), env?, cwd?} -> {returncode, stdout, stderr, truncated, timed_out}
    SYNC = "sync"  # {drop_caches?} -> {}
    POWEROFF = "poweroff"  # {} -> {}
    FILES_WRITE = "files_write"  # {path, data (b64)} -> {path, size}
    FILES_READ = "files_read"  # {path} -> {path, data (b64)}
    FILES_LIST = "files_list"  # {path} -> {path, entries: [{name, path, type, size}]}
    KERNEL_START = "kernel_start"  # {key, env, preload?, limits?} -> {pid}: (re)starts, killing the old tree
    KERNEL_INTERRUPT = "kernel_interrupt"  # {} -> {alive}: SIGINT to the kernel
    KERNEL_KILL_CHILDREN = "kernel_kill_children"  # {all?} -> {killed, pids_max_hit}: the cell's processes
    KERNEL_STATUS = "kernel_status"  # {} -> {alive, pid, returncode, procs, pids_max, memory_current, ...}


class Event(str, enum.Enum):
    KERNEL_DIED = "kernel_died"  # {returncode, oom_killed}
    DROPPED = "dropped"  # {channel, bytes}: a kernel message too big for one frame


class ErrorKind(str, enum.Enum):
    BAD_REQUEST = "BadRequest"
    UNKNOWN_OP = "UnknownOp"
    VERSION_MISMATCH = "VersionMismatch"
    NOT_FOUND = "NotFound"
    IS_A_DIRECTORY = "IsADirectory"
    NOT_A_DIRECTORY = "NotADirectory"
    PERMISSION_DENIED = "PermissionDenied"
    TOO_LARGE = "TooLarge"
    SPAWN_FAILED = "SpawnFailed"
    NO_KERNEL = "NoKernel"
    INTERNAL = "Internal"
