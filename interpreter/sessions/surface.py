"""The sandbox surface beside cells (E2B's `commands`, more of `files`, `get_metrics`), for one session.

Each call runs while the session is in use (a paused or saved session is resumed first, and none
is paused under it), and a guest link that dies mid-call becomes the session's verdict (410 with
its cause), as for cells. A command's stream keeps the session in use until the command ends.
"""

from __future__ import annotations

from typing import AsyncIterator

from ..errors import GuestProtocolError, InvalidRequest, LinkClosed
from ..kernel.commands import CommandExit, CommandOutput, CommandRunner, CommandStarted
from ..kernel.watch import FilesEvent, WatchRunner  # noqa: F401 (FilesEvent for the server)

MAX_TIMEOUT_S = 24 * 3600.0


async def run_command(session, cmd: str, envs: dict[str, str] | None = None, cwd: str | None = None,
                      timeout: float | None = None) -> AsyncIterator[CommandStarted | CommandOutput | CommandExit]:
    """Yields the command's events; closing the iterator early kills the command."""
    if not isinstance(cmd, str) or not cmd.strip():
        raise InvalidRequest("`cmd` must be a non-empty string")
    if timeout is not None and not 0 <= timeout <= MAX_TIMEOUT_S:
        raise InvalidRequest(f"`timeout` must be 0..{MAX_TIMEOUT_S:g} seconds (0: none)")
    async with session._use():
        session.check()
        events = CommandRunner.of(session.kernel.agent).run(cmd, envs, cwd, timeout)
        try:
            async for event in events:
                session.touch()
                yield event
        except (LinkClosed, GuestProtocolError):
            await session.check_after_link_failure()
            raise
        finally:
            await events.aclose()


async def watch_dir(session, path: str, recursive: bool = False) -> AsyncIterator[FilesEvent]:
    """Yields the changes below `path` until the iterator is closed (then the guest's watch ends).
    A watch, unlike a command, does not keep its session in use: the session may be paused or saved
    under it (its idle timers run as usual); the guest's watch is part of the VM's state, so changes
    flow again once the session is back (nothing changes while it is stopped; events the guest sent
    in the instant before a pause may be lost)."""
    async with session._use():  # running, and the watch set up before any pause
        session.check()
        events = WatchRunner.of(session.kernel.agent).watch(path, recursive)
        yield await events.__anext__()  # WatchStarted
    try:
        async for event in events:
            session.touch()
            yield event
    except (LinkClosed, GuestProtocolError):
        await session.check_after_link_failure()
        raise
    finally:
        await events.aclose()


async def kill_command(session, command_id: str) -> bool:
    return await session._agent_in_use(lambda: CommandRunner.of(session.kernel.agent).kill(command_id))


async def files_exists(session, path: str) -> bool:
    return await session._agent_in_use(lambda: session.kernel.agent.files_exists(path))


async def files_remove(session, path: str) -> None:
    await session._agent_in_use(lambda: session.kernel.agent.files_remove(path))


async def files_make_dir(session, path: str) -> bool:
    return await session._agent_in_use(lambda: session.kernel.agent.files_make_dir(path))


async def files_rename(session, path: str, new_path: str) -> dict:
    return await session._agent_in_use(lambda: session.kernel.agent.files_rename(path, new_path))


async def metrics(session) -> dict:
    return await session._agent_in_use(lambda: session.kernel.agent.metrics())
