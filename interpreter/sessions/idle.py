"""Auto-pause: what an idle session costs, stage by stage.

A session with no request and no cell for `auto_pause_s` is suspended (QMP stop: no CPU). One that
stayed paused for `save_after_s` more is saved to disk (its RAM freed). The next request brings it
back either way (Session.ensure_running). Checked every second or so by one task per manager.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("vmcell.sessions")


class IdlePolicy:
    def __init__(self, manager, auto_pause_s: float | None, save_after_s: float | None):
        self._manager = manager
        self.auto_pause_s, self.save_after_s = auto_pause_s, save_after_s
        periods = [p / 2 for p in (auto_pause_s, save_after_s) if p]
        self.period = min([1.0, *periods])
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.auto_pause_s or self.save_after_s:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.tick(time.time())
            except Exception:
                log.exception("the idle policy failed (it carries on)")

    async def tick(self, now: float) -> None:
        from .session import SessionState

        for session in self._manager.list():
            if session.gone is not None or not session.idle:
                continue
            if (session.state == SessionState.RUNNING and self.auto_pause_s
                    and now - session.last_activity >= self.auto_pause_s):
                if await session.suspend():
                    log.info("session %s auto-paused after %.0f s idle", session.id, now - session.last_activity)
            elif (session.state == SessionState.PAUSED and self.save_after_s and session.paused_at is not None
                  and now - session.paused_at >= self.save_after_s):
                await session.save(wait_idle=False)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
