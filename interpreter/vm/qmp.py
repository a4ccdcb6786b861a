"""A minimal asyncio QMP client: greeting, capabilities negotiation, commands matched by id."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from ..errors import VMStartError


class QMPError(Exception):
    pass


class QMPClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, path: Path) -> "QMPClient":
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        client = cls(reader, writer)
        greeting = json.loads(await reader.readline() or b"{}")
        if "QMP" not in greeting:
            writer.close()
            raise VMStartError(f"unexpected QMP greeting from {path}: {greeting!r}")
        client._task = asyncio.create_task(client._read_loop())
        await client.execute("qmp_capabilities")
        return client

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                fut = self._pending.pop(message.get("id"), None)
                if fut and not fut.done():
                    fut.set_result(message)
        except (ConnectionError, ValueError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(QMPError("QMP connection closed"))
            self._pending.clear()

    async def execute(self, command: str, **arguments) -> object:
        if self._task is not None and self._task.done():
            raise QMPError("QMP connection closed")
        request_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        request = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        reply = await fut
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    async def close(self) -> None:
        self._writer.close()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
