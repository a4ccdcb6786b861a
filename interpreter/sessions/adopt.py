"""A restarted server takes back the sessions the registry names (registry.py).

  running   the QEMU still runs: adopted through a pidfd (vm/process.py) and its QMP socket; a new
            link connection, hello (which resynchronises the byte stream: the old server may have
            been cut mid-frame), then the kernel's status. A cell the old server had sent and
            never saw end (`busy_with`) has no one waiting for it any more: it is interrupted,
            and the session remembers it (`interrupted_cell`) so whoever reconnects learns why
            its cell never answered instead of waiting.
  paused    the same, with the VM let run only for that handshake, then stopped again.
  saved     nothing runs: the session comes back in state `saved`; its next request restores it.

A session that cannot come back (its VM exited meanwhile, its template build is no longer the one
served) is ended with the reason (AdoptionFailed), which its id then answers with (410).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmcell_guest.wire import Channel

from ..config import RESTORE_TIMEOUT_S
from ..errors import SessionGone, TemplateMissing, VmcellError
from .. import network
from ..kernel import Kernel
from ..network import NetworkPolicy
from ..kernel.agent import AgentClient
from ..kernel.link import GuestLink
from ..vm.backend import Snapshot
from ..vm.workdir import Workdir
from . import pause
from .registry import SessionRecord
from .session import Identity, Session, SessionState

if TYPE_CHECKING:
    from .manager import SessionManager

log = logging.getLogger("vmcell.sessions")

# How long an interrupted orphan cell gets to end before the session is served (a cell that ignores
# SIGINT is then the engine's to stop, as any cell past its timeout).
ORPHAN_SETTLE_S = 10.0


class AdoptionFailed(SessionGone):
    """A session of the registry that a restarted server could not take back (the reason is named)."""


async def adopt(manager: "SessionManager", record: SessionRecord) -> Session:
    what = f"session {record.id}"
    try:
        built = await manager.catalog.get(record.template)
    except TemplateMissing as exc:
        raise AdoptionFailed(f"{what} is gone: its template is missing after the restart ({exc})") from None
    if built.key != record.build:
        raise AdoptionFailed(f"{what} is gone: its template {record.template!r} was rebuilt while the server was "
                             f"down (build {record.build}, now {built.key}), and a VM resumes only on its own build")
    link = GuestLink.unattached(name=f"session {record.id[:8]}")
    agent = AgentClient(link)
    kernel = Kernel.attach(agent, built.kernel_key, record.env, built.spec.preload)
    session = Session(
        record.id, built, None, kernel, Identity(record.hostname, record.machine_id, b""), backend=manager.backend,
        workdir=Workdir.existing(Path(record.workdir)), base=Snapshot(Path(record.base_memory), Path(record.base_state)),
        env=dict(record.env), durable=True, created_at=record.created_at, restore_ms=record.restore_ms,
        last_activity=record.last_activity, expires_at=record.expires_at, idle_timeout=record.idle_timeout,
        paused_at=record.paused_at, generation=record.generation, state=SessionState(record.state),
        network=NetworkPolicy.parse(record.network), kernel_name=record.kernel_name, metrics=manager.metrics)
    if session.state == SessionState.SAVED:
        return session  # pause.load checks its files when it is used (410 naming a missing one)
    try:
        session.vm = await manager.backend.attach(pause.vm_config(session), session.workdir)
    except VmcellError as exc:
        await link.close()
        raise AdoptionFailed(f"{what} is dead: its VM stopped while the server was down ({exc})") from None
    try:
        if session.state == SessionState.PAUSED:
            await session.vm.resume()  # just for the handshake
        await link.reattach(session.vm.link_path)
        await agent.handshake(RESTORE_TIMEOUT_S)
        await _end_orphaned_cell(session)
        await network.attach(session)  # its egress, while the VM runs
        if session.state == SessionState.PAUSED:
            await session.vm.pause()
    except VmcellError as exc:
        await session.release()
        raise AdoptionFailed(f"{what} is dead: its guest did not answer after the restart ({exc})") from None
    return session


async def _end_orphaned_cell(session: Session) -> None:
    status = await session.kernel.agent.kernel_status()
    busy = status.get("busy_with")
    if busy is None:
        return
    # A gateway client (JupyterLab) that sent it reconnects with its session id and gets the
    # cell's end: this note, then the kernel's own KeyboardInterrupt error, reply and idle status.
    session.channels.expect(busy.get("session") or "")
    session.kernel.router.publish(Channel.IOPUB, "stream", {"name": "stderr", "text": (
        "\n[vmcell: the server restarted while this cell ran; what it printed meanwhile is lost, "
        "and it is being interrupted]\n")}, {"msg_id": busy["msg_id"], "session": busy.get("session") or "",
                                           "msg_type": "execute_request", "username": "", "version": "5.3"})
    await session.kernel.agent.kernel_interrupt()
    report = await session.kernel.agent.kernel_kill_children()
    # Until the kernel has answered it, a new cell would be aborted behind it (stop_on_error).
    deadline = time.monotonic() + ORPHAN_SETTLE_S
    while (await session.kernel.agent.kernel_status()).get("busy_with") is not None:
        if time.monotonic() > deadline:
            log.warning("session %s: the interrupted cell %s has not ended after %gs", session.id, busy["msg_id"],
                        ORPHAN_SETTLE_S)
            break
        await asyncio.sleep(0.05)
    session.interrupted_cell = {
        "msg_id": busy["msg_id"], "session": busy.get("session"),
        "reason": "the server stopped while this cell ran; it was interrupted when the server came back "
                  f"({report.killed} processes it started were killed), and its output is lost"}
    log.warning("session %s: interrupted cell %s, which the previous server had sent", session.id, busy["msg_id"])
