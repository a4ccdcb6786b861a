"""The agent's control operations, events and error kinds: listed once, used by both ends.

Stdlib only: the host package imports it too (`from vmcell_guest.ops import Op`). The members are
`str` enums, so `Op.ping == "ping"` and they serialize to JSON as their plain names.
docs/link-protocol.md describes each op in full; the comments here are the one-line summary
(`args -> result`; `-` means an empty object).
"""

from __future__ import annotations

import enum


class Op(str, enum.Enum):
    """Control requests, host -> guest: {"id", "op", "args"} answered by {"id", "ok", "result"|"error"}."""

    # {version, sync (32 hex)} -> {version, agent, boot_id, pid}, written right after the sync marker
    #   (GUEST_SYNC_MAGIC + sync); VersionMismatch if versions differ
    hello = "hello"
    ping = "ping"  # - -> {monotonic_ns}
    identity = "identity"  # {entropy (b64), time_ns, hostname, machine_id} -> -
    clock = "clock"  # {time_ns} -> {offset_ms: guest minus host, before CLOCK_REALTIME is set to time_ns}
    run = "run"  # {argv, timeout?, stdin? (b64), env?, cwd?} -> {returncode, stdout, stderr (b64), truncated, timed_out}
    sync = "sync"  # {drop_caches?} -> -
    poweroff = "poweroff"  # - -> -
    files_write = "files_write"  # {path, data (b64)} -> {path, size}
    files_read = "files_read"  # {path} -> {path, data (b64)}
    files_list = "files_list"  # {path} -> {path, entries: [{name, path, type, size}]}
    # Every kernel op takes `context`? (a slot: 0, the default kernel, when absent; 1..MAX_CONTEXT_SLOT
    #   a code context, its own kernel; NoKernel for a context that was never started or was stopped).
    # {key, env?, preload?: [module], limits?: {pids_max?, memory_reserve_mib?, memory_margin_mib?},
    #   mode?: "fork"|"exec", context?, language?: "python"|"bash", cwd?: absolute path}
    #   -> {pid, mode, spawn_ms, limits: {pids_max, memory_max, memory_high}, preload: {imported, failed}}
    kernel_start = "kernel_start"
    kernel_interrupt = "kernel_interrupt"  # {context?} -> {alive}; SIGINT to the kernel process
    kernel_kill_children = "kernel_kill_children"  # {all?, context?} -> {killed, pids_max_hit, frozen}; NoKernel
    # - -> {alive, pid, returncode, procs, pids_max, pids_max_hit (since the last cell began), memory_current,
    #       memory_max, memory_high, oom_kills, controllers, mode,
    #       forkserver: {pid, alive, imported, failed} | null,
    #       busy_with: {msg_id, session} of the execute_request the kernel is running | null}
    kernel_status = "kernel_status"
    # {context (1..)} -> {context}: a code context removed: its kernel tree killed, its cgroup removed
    kernel_stop = "kernel_stop"
    # {sync (32 hex)} -> {listen, dropped}: network for this session (egress.py): the listener on
    #   127.0.0.1:3128 (started once), every stream dropped, the egress port resynced with this nonce
    egress = "egress"
    # ---- the sandbox surface E2B's SDK has (commands.py, fsops.py, metrics.py) ----
    # {id (host's, alnum), cmd, envs?, cwd?, timeout? (s, 0: none)} -> {id, pid}; output and end follow as
    #   command_output / command_exit events; /bin/bash -c in its own cgroup (commands/c<id>)
    command_start = "command_start"
    command_kill = "command_kill"  # {id} -> {killed}: SIGKILL to everything the command started
    files_exists = "files_exists"  # {path} -> {path, exists}
    files_remove = "files_remove"  # {path} -> {path}; a directory with its contents
    files_make_dir = "files_make_dir"  # {path} -> {path, created} (False: it existed); parents too
    files_rename = "files_rename"  # {path, new_path} -> {name, path, type, size} of the moved entry
    files_watch = "files_watch"  # {id (host's), path, recursive?} -> {id, path}; changes follow as files_event
    files_unwatch = "files_unwatch"  # {id} -> {stopped}
    # - -> {cpu_count, cpu_used_pct, mem_used, mem_total, disk_used, disk_total (bytes), timestamp (s)}
    metrics = "metrics"


class Event(str, enum.Enum):
    """Unsolicited messages, guest -> host: {"event": name, ...fields}; the kernel events carry
    `context` (the slot of the kernel they are about; absent: 0)."""

    kernel_died = "kernel_died"  # {returncode: int|null, oom_killed: bool, memory_max: int|null}
    dropped = "dropped"  # {channel, bytes}: a kernel message too large for one frame
    # {action: "interrupt"|"oom_kill", msg_id: str|null, memory_current, memory_max, memory_high: int|null}:
    # the running cell crossed the kernel's high-water mark and was interrupted (SIGINT), or the OOM
    # killer killed one of its processes and the kernel lived (the kernel's own death: kernel_died)
    memory_limit = "memory_limit"
    command_output = "command_output"  # {id, stream: "stdout"|"stderr", data: str} (<= 64 KiB each)
    # {id, exit_code: int (negative: signal), error: str|null, timed_out: bool, truncated: [stream]}
    command_exit = "command_exit"
    # {id, name (relative to the watched directory), type: create|write|remove|rename|chmod|overflow}
    files_event = "files_event"


class ErrorKind(str, enum.Enum):
    """`error.type` of a failed request ({"type", "message"})."""

    BadRequest = "BadRequest"  # malformed args (wrong type, missing, out of range)
    UnknownOp = "UnknownOp"  # op not in this table
    VersionMismatch = "VersionMismatch"  # hello with another protocol version
    NotFound = "NotFound"  # FileNotFoundError
    IsADirectory = "IsADirectory"  # IsADirectoryError
    NotADirectory = "NotADirectory"  # NotADirectoryError
    PermissionDenied = "PermissionDenied"  # PermissionError
    TooLarge = "TooLarge"  # a file transfer past the per-transfer cap
    SpawnFailed = "SpawnFailed"  # a process (run, kernel) could not be started
    NoKernel = "NoKernel"  # a kernel op that needs a live kernel, and there is none
    Internal = "Internal"  # anything unexpected: an agent bug; the message says what


class OpError(Exception):
    """Raised by an op's implementation: the agent answers {"type": kind, "message": str(exc)}."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind


# Answered on the agent's reader thread: they never block, so ping stays instant.
INLINE_OPS = frozenset({Op.hello, Op.ping, Op.identity, Op.clock, Op.kernel_interrupt, Op.kernel_status})
