"""Durable sessions: the registry that lets sessions outlive the server, in SQLite under the state dir.

    <state dir>/registry.sqlite3   one row per live session: its SessionRecord as JSON
    <state dir>/server.lock        flock'ed by the one server that owns the directory
    <state dir>/vms/<id>/          each session's VM directory (sockets, disk overlay, saved states)
    <state dir>/forks/<id>/        fork captures, kept while a child uses them

A row is written whenever the session's state or settings change (one INSERT OR REPLACE: atomic),
and deleted when the session ends. The QEMUs of these sessions are not tied to the server (no
parent-death signal, their own process session), so a server stopped with SIGTERM or killed with
SIGKILL leaves them running, paused or saved; the next server on the same directory reads the rows
and adopts them (adopt.py). A VM directory or capture that no row names is reaped at start.

WAL with synchronous=NORMAL: a commit survives the process being killed (what we need: SIGKILL,
a crash), not a power cut, and costs well under a millisecond on the IO loop, no fsync per row.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..errors import VmcellError
from ..vm.workdir import remove_vm_dir

log = logging.getLogger("vmcell.sessions")

SCHEMA_VERSION = 1
REGISTRY_FILE = "registry.sqlite3"
LOCK_FILE = "server.lock"


class StateDirBusy(VmcellError):
    """Another server owns this state directory (its sessions are its own)."""


@dataclass(frozen=True)
class SessionRecord:
    """What a new server needs to serve a session again under the same id."""

    id: str
    template: str  # name
    build: str  # the template build's key: a session is adopted only by a server serving that build
    state: str  # running, paused or saved
    workdir: str
    base_memory: str  # the RAM image its VM maps copy-on-write (template, fork capture or saved-N)
    base_state: str
    fork_capture: str | None  # the fork capture its disk and RAM go back to, kept while it lives
    generation: int
    hostname: str
    machine_id: str
    created_at: float
    last_activity: float
    expires_at: float | None = None
    idle_timeout: float | None = None
    paused_at: float | None = None
    restore_ms: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    network: dict | None = None  # NetworkPolicy.to_json(), header values included (the file is 0600)
    kernel_name: str | None = None  # Session.kernel_name (a gateway kernelspec alias such as python3)

    @classmethod
    def of(cls, session, fork_capture: Path | None) -> "SessionRecord":
        return cls(
            id=session.id, template=session.template.spec.name, build=session.template.key,
            state=session.state.value, workdir=str(session.workdir.path), base_memory=str(session.base.memory),
            base_state=str(session.base.state), fork_capture=str(fork_capture) if fork_capture else None,
            generation=session.generation, hostname=session.identity.hostname,
            machine_id=session.identity.machine_id, created_at=session.created_at,
            last_activity=session.last_activity, expires_at=session.expires_at, idle_timeout=session.idle_timeout,
            paused_at=session.paused_at, restore_ms=session.restore_ms, env=dict(session.env),
            network=session.network.to_json() if session.network is not None else None,
            kernel_name=session.kernel_name)

    @classmethod
    def parse(cls, text: str) -> "SessionRecord":
        """ValueError for a row this version cannot read (never guessed at: such a session is dropped)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ValueError(f"missing {f.name}")
                continue
            values[f.name] = data[f.name]
        record = cls(**values)
        kinds = {"id": str, "template": str, "build": str, "state": str, "workdir": str, "base_memory": str,
                 "base_state": str, "generation": int, "hostname": str, "machine_id": str, "env": dict}
        for name, kind in kinds.items():
            if not isinstance(getattr(record, name), kind):
                raise ValueError(f"{name} is not a {kind.__name__}")
        if record.network is not None and not isinstance(record.network, dict):
            raise ValueError("network is not an object")
        if record.kernel_name is not None and not isinstance(record.kernel_name, str):
            raise ValueError("kernel_name is not a string")
        if record.state not in ("running", "paused", "saved"):
            raise ValueError(f"state {record.state!r}")
        return record


class SessionRegistry:
    def __init__(self, directory: Path):
        self.directory = directory
        self.vms = directory / "vms"
        self.forks = directory / "forks"
        self._db: sqlite3.Connection | None = None
        self._lock_fd = -1

    def open(self) -> None:
        """Takes the directory (StateDirBusy if another server has it) and opens the database."""
        for path in (self.directory, self.vms, self.forks):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirBusy(f"another vmcell server (pid {holder}) serves the sessions in {self.directory}; "
                               "stop it, or give this one its own --state-dir (or --ephemeral)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        self._db = sqlite3.connect(self.directory / REGISTRY_FILE, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            self.close()
            raise VmcellError(f"{self.directory / REGISTRY_FILE} has schema {row[0]}, this vmcell reads "
                              f"{SCHEMA_VERSION}: start with another --state-dir")
        os.chmod(self.directory / REGISTRY_FILE, 0o600)  # env values may be secrets

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def records(self) -> list[SessionRecord]:
        """Every readable row; an unreadable one is logged and deleted (its VM is reaped as unowned)."""
        records = []
        for session_id, text in self._db.execute("SELECT id, record FROM sessions").fetchall():
            try:
                records.append(SessionRecord.parse(text))
            except (ValueError, TypeError) as exc:
                log.error("registry: dropping the unreadable row of session %s (%s)", session_id, exc)
                self.forget(session_id)
        return records

    def put(self, record: SessionRecord) -> None:
        self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (record.id, json.dumps(asdict(record))))

    def forget(self, session_id: str) -> None:
        if self._db is not None:
            self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def reap_unowned(self, kept_vms: set[Path], kept_forks: set[Path]) -> list[str]:
        """Kills the QEMU of and removes every VM directory no live row names; removes unnamed captures."""
        reaped = []
        for root, kept in ((self.vms, kept_vms), (self.forks, kept_forks)):
            for path in root.iterdir():
                if path in kept or not path.is_dir():
                    continue
                remove_vm_dir(path, "no session in the registry owns it")
                reaped.append(path.name)
        if reaped:
            log.info("registry: reaped %d directories no session owns: %s", len(reaped), ", ".join(reaped))
        return reaped
