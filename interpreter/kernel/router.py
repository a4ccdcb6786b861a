"""Jupyter messages over the guest link: signed on the way in, verified on the way out, delivered.

Like jupyter_client's session.py, this is the one place that holds the kernel's key. Every message
the kernel sends is checked (signature, JSON, header shape) and handed first to the owner (the cell
engine, which may withhold a message: output past a cell's cap) and then to every subscriber (the
gateway's websockets, the kernel lifecycle). A subscriber that raises is logged and dropped; it
never takes the link's reader down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from jupyter_client.session import Session as JupyterSession

from vmcell_guest.wire import Channel, Frame, ProtocolError, decode_multipart, encode_multipart

from .link import GuestLink

log = logging.getLogger("vmcell.router")


@dataclass(frozen=True, slots=True)
class KernelMessage:
    channel: Channel
    msg: dict  # header, parent_header, metadata, content (dicts), buffers
    raw_parts: list[bytes]  # header, parent, metadata, content, buffers: as signed, for relaying verbatim

    @property
    def msg_type(self) -> str:
        return self.msg["header"]["msg_type"]

    @property
    def parent_id(self) -> str | None:
        parent = self.msg["parent_header"].get("msg_id")
        return parent if isinstance(parent, str) else None

    @property
    def content(self) -> dict:
        return self.msg["content"]

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.raw_parts)


Owner = Callable[[KernelMessage], bool]
Subscriber = Callable[[KernelMessage], None]


class MessageRouter:
    def __init__(self, link: GuestLink, key: bytes, slot: int = 0):
        self.link = link
        self.slot = slot  # the kernel's slot on the link: 0 the default kernel, 1.. a code context
        self.session = JupyterSession(key=key, signature_scheme="hmac-sha256", username="vmcell")
        self.owner: Owner | None = None
        self._subscribers: list[Subscriber] = []
        self._replies: dict[str, asyncio.Future] = {}
        if slot:
            link.set_slot_handler(slot, self._on_frame)
        else:
            link.on_channel_frame = self._on_frame

    def detach(self) -> None:
        """A removed code context: its frames are no longer ours (late ones are dropped by the link)."""
        self.link.set_slot_handler(self.slot, None)

    # ---- subscribers ------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        if subscriber not in self._subscribers:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # ---- incoming ---------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        parts = decode_multipart(frame.body)
        try:
            _, msg_list = self.session.feed_identities(parts, copy=True)
            msg = self.session.deserialize(msg_list, content=True, copy=True)
        except Exception as exc:  # bad signature, JSON, or shape: all the guest's fault
            raise ProtocolError(f"invalid Jupyter message on {frame.channel.name}: {exc!r}") from None
        header = msg.get("header")
        if not (isinstance(header, dict) and isinstance(header.get("msg_type"), str)
                and isinstance(msg.get("parent_header"), dict) and isinstance(msg.get("content"), dict)
                and isinstance(msg.get("metadata"), dict)):
            raise ProtocolError(f"invalid Jupyter message on {frame.channel.name}: bad header or content")
        message = KernelMessage(frame.channel, msg, msg_list[1:])
        if frame.channel in (Channel.SHELL, Channel.KCONTROL) and message.parent_id in self._replies:
            fut = self._replies.pop(message.parent_id)
            if not fut.done():
                fut.set_result(message)
            return  # a reply to our own request: nobody else asked
        self.deliver(message)

    def deliver(self, message: KernelMessage, include_owner: bool = True) -> None:
        if include_owner and self.owner is not None and not self.owner(message):
            return
        for subscriber in list(self._subscribers):
            try:
                subscriber(message)
            except Exception:
                log.exception("%s: a message subscriber failed; it is dropped", self.link.name)
                self.unsubscribe(subscriber)

    def publish(self, channel: Channel, msg_type: str, content: dict, parent: dict | None = None) -> None:
        """A message of our own to the subscribers, as if the kernel had sent it (a status the
        kernel cannot send because it is dead, a reply for a cell it will never answer)."""
        msg = self.session.msg(msg_type, content, parent=parent or {})
        raw = self.session.serialize(msg)  # [<IDS|MSG>, signature, header, parent, metadata, content]
        msg = {**msg, "buffers": []}
        self.deliver(KernelMessage(channel, msg, raw[2:]), include_owner=False)

    # ---- outgoing ---------------------------------------------------------------------------

    def new_message(self, msg_type: str, content: dict, metadata: dict | None = None) -> dict:
        return self.session.msg(msg_type, content, metadata=metadata or {})  # a fresh msg_id every time

    async def send(self, channel: Channel, msg: dict) -> None:
        await self.link.send_frame(encode_multipart(channel, self.session.serialize(msg), self.slot))

    async def forward(self, channel: Channel, parts: list[bytes]) -> None:
        """A client's message (header, parent, metadata, content, buffers as bytes), signed here
        with the kernel's key: clients never hold it."""
        signature = self.session.sign(parts[:4])
        await self.link.send_frame(encode_multipart(channel, [b"<IDS|MSG>", signature, *parts], self.slot))

    async def request(self, channel: Channel, msg_type: str, content: dict, timeout: float) -> KernelMessage:
        """Sends a request of our own and waits for its reply (which nobody else sees)."""
        msg = self.new_message(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        fut = asyncio.get_running_loop().create_future()
        self._replies[msg_id] = fut
        try:
            await self.send(channel, msg)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(msg_id, None)
