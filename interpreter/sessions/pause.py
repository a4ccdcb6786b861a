"""What pausing means for a session, in two stages, and the way back.

  suspend   QMP `stop`: the vCPUs halt, the VM costs no CPU, its memory stays where it is.
  wake      QMP `cont`, then the guest clock is set from the host's (it stood still while stopped).
  save      the VM is captured to disk (vm.snapshot: a sparse RAM image + a RAM-less device state, in
            the session's workdir, beside its writable disk), its link detached, QEMU quit: its RAM
            is freed. The state is `saved`.
  load      a new QEMU restores that capture (mapping the RAM image copy-on-write, as from a template),
            the same link object reattaches, hello (which resynchronises the byte stream), clock.

The Session decides when (its transition lock, waiting for requests in progress); this module only
knows how. Each save writes a new saved-N directory and drops the previous one once the new one is
complete, so a crash mid-save still leaves one good copy.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import TYPE_CHECKING

from .. import network
from ..config import RESTORE_TIMEOUT_S
from ..errors import SavedStateMissing
from ..vm.backend import Drive, MemoryFile, Snapshot

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("vmcell.sessions")

WRITABLE_DISK = "rw.qcow2"  # the session's own layer, in its workdir
SAVED_PREFIX = "saved-"


def vm_config(session: "Session"):
    """The session's VM: its template's devices, its own disk, its base RAM image copy-on-write."""
    return session.template.vm_config(Drive(session.workdir.file(WRITABLE_DISK), format="qcow2"),
                                      MemoryFile(session.base.memory, shared=False))


async def suspend(session: "Session") -> None:
    from .session import SessionState

    await session.vm.pause()
    session._set_state(SessionState.PAUSED)


async def wake(session: "Session") -> float:
    """Returns the guest clock's offset before it was corrected, in ms."""
    from .session import SessionState

    await session.vm.resume()
    offset_ms = await session.kernel.agent.set_clock()
    session._set_state(SessionState.RUNNING)
    return offset_ms


async def save(session: "Session") -> None:
    from .session import SessionState

    start = time.perf_counter()
    generation = session.generation + 1
    directory = session.workdir.file(f"{SAVED_PREFIX}{generation}")
    directory.mkdir(exist_ok=True)
    try:
        captured = await session.vm.snapshot(directory, copy_disk=False)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        if session.vm.running():
            await session.vm.resume()  # the capture failed: the session runs on as it was
        raise
    await network.detach(session)
    await session.link.detach()
    await session.vm.stop(remove_workdir=False)
    previous = session.base
    session.vm, session.generation = None, generation
    session.base = Snapshot(memory=captured.memory, state=captured.state)
    _drop_own_saved(session, previous)
    session._set_state(SessionState.SAVED)
    log.info("session %s saved to disk in %.0f ms", session.id, (time.perf_counter() - start) * 1000)


async def load(session: "Session") -> None:
    from .session import SessionState

    start = time.perf_counter()
    missing = session.base.missing()
    if not session.workdir.file(WRITABLE_DISK).exists():
        missing.append(str(session.workdir.file(WRITABLE_DISK)))
    if missing:
        gone = SavedStateMissing(f"session {session.id} cannot be resumed: its saved state is incomplete "
                                 f"(missing: {', '.join(missing)})")
        session._end(SessionState.DEAD, gone)
        if session.on_end is not None:
            session.on_end(session)
        raise gone
    vm = await session.backend.restore(vm_config(session), session.workdir, session.base.state,
                                       die_with_owner=not session.durable)
    try:
        await session.link.reattach(vm.link_path)
        await session.kernel.agent.handshake(RESTORE_TIMEOUT_S)
        await session.kernel.agent.set_clock()
        session.vm = vm
        await network.attach(session)
    except BaseException:
        session.vm = None
        await network.detach(session)
        await session.link.detach()
        await vm.stop(remove_workdir=False)
        raise
    session.vm = vm
    session._set_state(SessionState.RUNNING)
    log.info("session %s restored from disk in %.0f ms", session.id, (time.perf_counter() - start) * 1000)


def _drop_own_saved(session: "Session", previous: Snapshot) -> None:
    """A base that lives in the session's own saved-N directory is the session's alone to delete."""
    parent = previous.memory.parent
    if parent.parent == session.workdir.path and parent.name.startswith(SAVED_PREFIX):
        shutil.rmtree(parent, ignore_errors=True)
