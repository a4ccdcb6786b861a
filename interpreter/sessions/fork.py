"""Live fork: n new sessions from one running session, at one instant.

The parent is captured (vm.snapshot: its RAM as a sparse image, its device state, a copy of its
writable disk) and resumed at once: its cells, streams and websockets carry on, they only stood
still for the capture. Each child restores from that capture like a session from a template: it
maps the RAM image copy-on-write (pages no child writes stay shared through the page cache), gets
an overlay over the copied disk, and a fresh identity (kernel entropy, hostname, machine-id, and on
its first cell `random` and NumPy's RNG reseeded). A cell the parent was running at that instant
goes on running, unseen, in each child; a child's first cell runs after it (the kernel queues it).

The capture lives in its own directory as long as any child does (ForkSnapshots).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from ..config import MAX_FORK_COUNT
from ..errors import InvalidRequest
from ..vm.backend import Snapshot
from ..vm.workdir import Workdir

log = logging.getLogger("vmcell.sessions")


def check_count(count, limit: int) -> int:
    most = min(MAX_FORK_COUNT, limit)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= most:
        raise InvalidRequest(f"fork count must be an integer from 1 to {most} (the fork and session limits), "
                             f"got {count!r}")
    return count


async def capture(parent, root: Path) -> Snapshot:
    """The parent at one instant, in a new directory under `root`; the parent runs on."""
    await parent.ensure_running()
    # A workdir of its own: owned by this process, so the janitor reaps it if we die.
    directory = Workdir.create(root).path
    start = time.perf_counter()
    async with parent._transition:  # no pause or save of the parent meanwhile
        try:
            snapshot = await parent.vm.snapshot(directory, copy_disk=True, runs_on=True)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            if parent.vm.running():
                await parent.vm.resume()
    await parent.kernel.agent.set_clock()  # it stood still for the capture
    log.info("session %s captured for a fork in %.0f ms", parent.id, (time.perf_counter() - start) * 1000)
    return snapshot


class ForkSnapshots:
    """Which children still use which capture; a capture is deleted with its last child."""

    def __init__(self) -> None:
        self._users: dict[Path, set[str]] = {}

    def hold(self, snapshot: Snapshot, session_ids: list[str]) -> None:
        self._users.setdefault(snapshot.state.parent, set()).update(session_ids)

    def hold_directory(self, directory: Path, session_id: str) -> None:
        """An adopted child (registry.py): its capture is held again, by id."""
        self._users.setdefault(directory, set()).add(session_id)

    def held_by(self, session_id: str) -> Path | None:
        return next((d for d, users in self._users.items() if session_id in users), None)

    def release(self, session_id: str) -> None:
        for directory, users in list(self._users.items()):
            users.discard(session_id)
            if not users:
                del self._users[directory]
                shutil.rmtree(directory, ignore_errors=True)

    def drop_unheld(self, directory: Path) -> None:
        if directory not in self._users:
            shutil.rmtree(directory, ignore_errors=True)


async def gather_children(restores: list) -> list:
    """Runs the children's restores; if any fails, the others are closed and the first error raised."""
    results = await asyncio.gather(*restores, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await asyncio.gather(*(r.close("a sibling fork failed") for r in results
                               if not isinstance(r, BaseException)), return_exceptions=True)
        raise failures[0]
    return results
