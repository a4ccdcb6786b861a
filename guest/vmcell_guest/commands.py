"""Shell commands with streamed output (E2B's `sandbox.commands.run`), in the guest.

`command_start` starts `/bin/bash -c CMD` and answers with its pid at once; its output follows as
`command_output` events (UTF-8 text, decoded incrementally, at most OUTPUT_CHUNK bytes each) and
its end as one `command_exit` event. The host picks the command's `id` (so it can route events
that arrive before the answer). `command_kill` SIGKILLs the command and everything it started.

Where commands run: in their own cgroup (v2), COMMANDS = /sys/fs/cgroup/commands, one child
cgroup per command (commands/c<id>), beside the kernel's (cgroup.py) and never inside it:
  - a kernel restart (cgroup.kill of the kernel's cgroup) or a cell's leftover-killing must not
    take a user's background server with it, and a command must not eat the kernel's pids or
    memory budget;
  - the agent, init and the fork server stay outside, so a runaway command (fork bomb, memory
    hog) meets its own limits: pids.max COMMANDS_PIDS_MAX and a memory.max computed as the
    kernel's is (MemTotal minus what the guest uses when the cgroup is made, minus the reserve),
    its own OOM kill rather than a guest-wide one;
  - a per-command child cgroup makes kill and timeout exact: `cgroup.kill` gets every process the
    command started, also those that left its process group (setsid, daemons).
Without cgroup v2 (another guest kernel) commands run in their own session and are killed by
process group. Every command dies with the VM, i.e. with its session.

Output is capped per stream (OUTPUT_CAP bytes): past it, output is drained and dropped and the
exit event lists the stream in `truncated`. A command past its `timeout` is killed and its exit
event says `timed_out` (exit_code -9 as for any SIGKILL).
"""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import threading
import time
from typing import Callable

from .cgroup import ROOT, KernelCgroup
from .ops import ErrorKind, Event, OpError
from .wire import encode_control

COMMANDS = f"{ROOT}/commands"
COMMANDS_PIDS_MAX = 1024
OUTPUT_CAP = 16 * 1024 * 1024  # per stream per command
OUTPUT_CHUNK = 64 * 1024  # per event
MAX_COMMANDS = 64  # running at once
MAX_CMD_CHARS = 1024 * 1024
SHELL = "/bin/bash"
HOME = "/root"
_ENTER = 'echo $$ > "$0/cgroup.procs" && echo 0 > /proc/self/oom_score_adj && exec "$@"'


class Command:
    def __init__(self, command_id: str, proc: subprocess.Popen, cgroup: str | None, timeout: float | None):
        self.id, self.proc, self.cgroup = command_id, proc, cgroup
        self.deadline = time.monotonic() + timeout if timeout else None
        self.timed_out = False
        self.killed = False
        self.truncated: list[str] = []


class Commands:
    """The running commands of this guest (one instance, in the agent)."""

    def __init__(self, write: Callable[[bytes], None]):
        self._write = write
        self._lock = threading.Lock()
        self._running: dict[str, Command] = {}
        self._cgroup_ok: bool | None = None

    def _event(self, event: Event, **fields) -> None:
        self._write(encode_control({"event": event, **fields}))

    def _parent_cgroup(self) -> bool:
        """Creates (once) the commands' cgroup with its limits; False without cgroup v2."""
        if self._cgroup_ok is None:
            group = KernelCgroup(COMMANDS)
            try:
                self._cgroup_ok = group.available()
                if self._cgroup_ok:
                    group.create(pids_max=COMMANDS_PIDS_MAX, memory_margin_mib=0)
            except OSError:
                self._cgroup_ok = False
        return self._cgroup_ok

    # ---- ops ---------------------------------------------------------------------------------

    def start(self, args: dict) -> dict:
        command_id, cmd = args.get("id"), args.get("cmd")
        if not isinstance(command_id, str) or not 1 <= len(command_id) <= 64 or not command_id.isalnum():
            raise OpError(ErrorKind.BadRequest, "id must be 1..64 letters or digits")
        if not isinstance(cmd, str) or not cmd or len(cmd) > MAX_CMD_CHARS or "\0" in cmd:
            raise OpError(ErrorKind.BadRequest, f"cmd must be a non-empty string of at most {MAX_CMD_CHARS} characters")
        envs = args.get("envs") or {}
        if not isinstance(envs, dict) or not all(isinstance(k, str) and k and "=" not in k and "\0" not in k
                                                 and isinstance(v, str) and "\0" not in v for k, v in envs.items()):
            raise OpError(ErrorKind.BadRequest, "envs must map names to strings")
        cwd = args.get("cwd") or HOME
        if not isinstance(cwd, str) or "\0" in cwd:
            raise OpError(ErrorKind.BadRequest, "cwd must be a string")
        cwd = os.path.normpath(os.path.join(HOME, cwd))
        if not os.path.isdir(cwd):
            raise OpError(ErrorKind.NotFound, f"no such directory: {cwd}")
        timeout = args.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                    or not 0 <= timeout < 1e7):
            raise OpError(ErrorKind.BadRequest, "timeout must be a number of seconds (0: none)")
        with self._lock:
            if command_id in self._running:
                raise OpError(ErrorKind.BadRequest, f"command {command_id} is already running")
            if len(self._running) >= MAX_COMMANDS:
                raise OpError(ErrorKind.TooLarge, f"at most {MAX_COMMANDS} commands run at once")
            argv = [SHELL, "-c", cmd]
            cgroup = None
            if self._parent_cgroup():
                cgroup = f"{COMMANDS}/c{command_id}"
                os.makedirs(cgroup, exist_ok=True)
                argv = ["/bin/sh", "-c", _ENTER, cgroup, *argv]
            env = dict(os.environ, HOME=HOME, **envs)
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
            except OSError as exc:
                _remove(cgroup)
                raise OpError(ErrorKind.SpawnFailed, str(exc)) from None
            command = Command(command_id, proc, cgroup, timeout or None)
            self._running[command_id] = command
        threading.Thread(target=self._supervise, args=(command,), name=f"command-{command_id}", daemon=True).start()
        return {"id": command_id, "pid": proc.pid}

    def kill(self, args: dict) -> dict:
        command_id = args.get("id")
        if not isinstance(command_id, str):
            raise OpError(ErrorKind.BadRequest, "id must be a string")
        with self._lock:
            command = self._running.get(command_id)
        if command is None:
            return {"killed": False}
        command.killed = True
        _kill(command)
        return {"killed": True}

    def kill_all(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for command in running:
            command.killed = True
            _kill(command)

    # ---- one command -------------------------------------------------------------------------

    def _supervise(self, command: Command) -> None:
        readers = [threading.Thread(target=self._pump, args=(command, name, stream), daemon=True)
                   for name, stream in (("stdout", command.proc.stdout), ("stderr", command.proc.stderr))]
        for reader in readers:
            reader.start()
        while True:
            remaining = None if command.deadline is None else command.deadline - time.monotonic()
            try:
                command.proc.wait(None if remaining is None else max(remaining, 0))
                break
            except subprocess.TimeoutExpired:
                command.timed_out = True
                _kill(command)
        if command.cgroup is not None:  # the shell is gone; what it left behind goes too
            _kill(command)
        for reader in readers:
            reader.join(5.0)
        with self._lock:
            self._running.pop(command.id, None)
        _remove(command.cgroup)
        returncode = command.proc.returncode
        error = None
        if command.timed_out:
            error = "the command timed out and was killed"
        elif command.killed:
            error = "the command was killed"
        self._event(Event.command_exit, id=command.id, exit_code=returncode, error=error,
                    timed_out=command.timed_out, truncated=command.truncated)

    def _pump(self, command: Command, name: str, stream) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sent = 0
        for chunk in iter(lambda: stream.read1(OUTPUT_CHUNK), b""):
            if sent >= OUTPUT_CAP:
                continue  # drained and dropped: a blocked pipe would hang the command
            chunk = chunk[: OUTPUT_CAP - sent]
            sent += len(chunk)
            if sent >= OUTPUT_CAP:
                command.truncated.append(name)
            text = decoder.decode(chunk)
            if text:
                self._event(Event.command_output, id=command.id, stream=name, data=text)
        tail = decoder.decode(b"", final=True)
        if tail:
            self._event(Event.command_output, id=command.id, stream=name, data=tail)
        stream.close()


def _kill(command: Command) -> None:
    """Its process group (what has not left it, and the shell before it entered its cgroup), then
    its cgroup (what left the group: setsid, daemons)."""
    try:
        os.killpg(command.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if command.cgroup is not None:
        try:
            with open(f"{command.cgroup}/cgroup.kill", "w") as f:
                f.write("1")
        except OSError:
            pass


def _remove(cgroup: str | None) -> None:
    """A child cgroup can go once empty (its processes are reaped shortly after cgroup.kill)."""
    if cgroup is None:
        return
    for _ in range(100):
        try:
            os.rmdir(cgroup)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
