"""A session: one VM restored from a template snapshot, and the link to its agent."""

from __future__ import annotations

import base64
import os
import time
import uuid
from dataclasses import dataclass, field

from ..kernel.client import EventCallback, KernelClient
from ..kernel.link import GuestLink
from ..kernel.results import ExecutionResult, OutputEvent
from ..templates import BuiltTemplate
from ..vm.backend import VM


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    truncated: tuple[str, ...] = ()
    timed_out: bool = False


@dataclass(frozen=True)
class Identity:
    """What makes a clone of the snapshot its own machine."""

    hostname: str
    machine_id: str
    entropy: bytes = field(repr=False)

    @classmethod
    def fresh(cls, session_id: str) -> "Identity":
        return cls(hostname=f"vmcell-{session_id[:8]}", machine_id=uuid.uuid4().hex, entropy=os.urandom(64))


@dataclass
class Session:
    id: str
    template: BuiltTemplate
    vm: VM
    link: GuestLink
    kernel: KernelClient
    identity: Identity
    created_at: float = field(default_factory=time.time)
    restore_ms: float = 0.0
    last_activity: float = field(default_factory=time.time)
    expires_at: float | None = None  # absolute lifetime end
    idle_timeout: float | None = None  # seconds without activity before the session is reaped

    @property
    def alive(self) -> bool:
        return self.vm.running() and not self.link.closed

    async def apply_identity(self) -> None:
        await self.link.request("identity", {
            "entropy": base64.b64encode(self.identity.entropy).decode(),
            "time_ns": time.time_ns(),
            "hostname": self.identity.hostname,
            "machine_id": self.identity.machine_id,
        })

    async def ping(self) -> float:
        """Round trip to the guest agent, in milliseconds."""
        start = time.perf_counter()
        await self.link.request("ping", timeout=10)
        return (time.perf_counter() - start) * 1000

    async def execute(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None,
                      on_event: EventCallback | None = None) -> ExecutionResult:
        self.touch()
        try:
            return await self.kernel.execute(code, timeout=timeout, env=env, on_event=on_event)
        finally:
            self.touch()

    def stream(self, code: str, timeout: float | None = None, env: dict[str, str] | None = None):
        """Async iterator of OutputEvents for one cell, ending with `end`."""
        self.touch()
        return self.kernel.stream(code, timeout=timeout, env=env)

    async def interrupt(self) -> None:
        await self.kernel.interrupt()

    async def restart(self) -> None:
        await self.kernel.restart()

    async def run(self, argv: list[str], timeout: float = 30.0, stdin: bytes = b"") -> RunResult:
        """Runs a program in the guest (tools and tests; user code goes through the kernel)."""
        reply = await self.link.request(
            "run", {"argv": argv, "timeout": timeout, "stdin": base64.b64encode(stdin).decode()},
            timeout=timeout + 10,
        )
        return RunResult(
            returncode=int(reply.get("returncode", -1)),
            stdout=base64.b64decode(reply.get("stdout", "")),
            stderr=base64.b64decode(reply.get("stderr", "")),
            truncated=tuple(reply.get("truncated", ())),
            timed_out=bool(reply.get("timed_out")),
        )

    # ---- files (paths relative to the guest's home directory) ---------------------------------

    async def write_file(self, path: str, data: bytes) -> dict:
        self.touch()
        return await self.link.request("files_write", {"path": path, "data": base64.b64encode(data).decode()}, timeout=60)

    async def read_file(self, path: str) -> bytes:
        self.touch()
        reply = await self.link.request("files_read", {"path": path}, timeout=60)
        return base64.b64decode(reply.get("data", ""))

    async def list_files(self, path: str = ".") -> list[dict]:
        self.touch()
        reply = await self.link.request("files_list", {"path": path}, timeout=30)
        entries = reply.get("entries")
        return entries if isinstance(entries, list) else []

    def touch(self) -> None:
        self.last_activity = time.time()

    def expired(self, now: float) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return True
        return self.idle_timeout is not None and not self.kernel.busy and now - self.last_activity >= self.idle_timeout

    async def close(self) -> None:
        try:
            await self.link.close()
        finally:
            await self.vm.stop()  # reaps QEMU and removes the workdir (overlay disk included)
