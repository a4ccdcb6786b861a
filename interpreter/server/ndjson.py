"""Streamed answers, one JSON object per line (`Accept: application/x-ndjson`): a cell's events
(rest.py), a command's output and a directory watch (surface.py).

While the stream is quiet a `{"type": "keepalive"}` line goes out every KEEPALIVE_S, so proxies and
clients see a live connection. A client that goes away cancels the pending step of the stream,
whose own cleanup then acts (a cell is interrupted, a command killed, a watch ended); the handler
returns without finishing the response.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import orjson
from tornado.iostream import StreamClosedError

from .base import BaseHandler

NDJSON = "application/x-ndjson"
KEEPALIVE_S = 5.0


class NdjsonHandler(BaseHandler):
    _pump: asyncio.Task | None = None

    def wants_ndjson(self) -> bool:
        return NDJSON in self.request.headers.get("Accept", "")

    def start_ndjson(self) -> None:
        self.set_header("Content-Type", NDJSON)
        self.set_header("Cache-Control", "no-cache")

    async def send_line(self, line: dict) -> None:
        self.write(orjson.dumps(line) + b"\n")
        await self.flush()

    async def stream_lines(self, events: AsyncIterator, to_line: Callable[[Any], dict],
                           stop: asyncio.Event | None = None) -> bool:
        """Sends each event as a line until the events end or `stop` is set (True), or the client
        leaves (False: the response is not to be finished)."""
        self._pump = asyncio.ensure_future(self._pump_lines(events, to_line, stop))
        try:
            await self._pump
        except (asyncio.CancelledError, StreamClosedError):
            return False
        return True

    async def _pump_lines(self, events: AsyncIterator, to_line, stop: asyncio.Event | None) -> None:
        iterator = events.__aiter__()
        step = None
        stopping = asyncio.ensure_future((stop or asyncio.Event()).wait())
        try:
            while True:
                step = asyncio.ensure_future(iterator.__anext__())
                while not (await asyncio.wait({step, stopping}, timeout=KEEPALIVE_S,
                                              return_when=asyncio.FIRST_COMPLETED))[0]:
                    await self.send_line({"type": "keepalive"})
                if not step.done():
                    return  # stopped
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                await self.send_line(to_line(event))
        finally:
            stopping.cancel()
            if step is not None:  # also a step that ended as the client left: its outcome is taken
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            await iterator.aclose()

    def on_connection_close(self) -> None:
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
