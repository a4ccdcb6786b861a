"""Pure logic of the kernel layers, with a fake link (the real-VM tests are in test_cell_engine.py)."""


import pytest
from jupyter_client.session import Session as JupyterSession

from interpreter.errors import GuestBadRequest, GuestFileNotFound, GuestOperationError, GuestTooLarge
from interpreter.kernel.agent import AgentClient
from interpreter.kernel.link import ControlEvent
from interpreter.kernel.router import MessageRouter
from vmcell_guest.ops import ErrorKind
from vmcell_guest.wire import Channel, Frame, encode_multipart

KEY = b"k" * 32


class FakeLink:
    name = "fake"

    def __init__(self):
        self.on_channel_frame = self.on_event = None
        self.failure = None
        self.answer = None  # what `request` raises or returns

    async def request(self, op, args=None, timeout=30, resync=False):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def kernel_frame(msg_type="stream", content=None, key=KEY):
    session = JupyterSession(key=key, signature_scheme="hmac-sha256")
    msg = session.msg(msg_type, content or {"name": "stdout", "text": "x"})
    return Frame(Channel.IOPUB, encode_multipart(Channel.IOPUB, session.serialize(msg))[5:])


def test_a_subscriber_that_raises_is_dropped_and_the_others_go_on():
    router = MessageRouter(FakeLink(), KEY)
    seen = []

    def broken(message):
        raise RuntimeError("boom")

    router.subscribe(broken)
    router.subscribe(seen.append)
    router.link.on_channel_frame(kernel_frame())
    router.link.on_channel_frame(kernel_frame())
    assert len(seen) == 2 and router.subscribers == 1


def test_the_owner_may_withhold_a_message_from_subscribers():
    router = MessageRouter(FakeLink(), KEY)
    seen = []
    router.owner = lambda message: message.content.get("text") != "secret"
    router.subscribe(seen.append)
    router.link.on_channel_frame(kernel_frame(content={"name": "stdout", "text": "secret"}))
    router.link.on_channel_frame(kernel_frame(content={"name": "stdout", "text": "fine"}))
    assert [m.content["text"] for m in seen] == ["fine"]


def test_a_message_signed_with_another_key_is_a_protocol_error():
    from vmcell_guest.wire import ProtocolError

    router = MessageRouter(FakeLink(), KEY)
    with pytest.raises(ProtocolError):
        router.link.on_channel_frame(kernel_frame(key=b"x" * 32))


@pytest.mark.parametrize("kind,expected,status", [
    (ErrorKind.NotFound, GuestFileNotFound, 404), (ErrorKind.BadRequest, GuestBadRequest, 400),
    (ErrorKind.IsADirectory, GuestBadRequest, 400), (ErrorKind.TooLarge, GuestTooLarge, 413),
    (ErrorKind.Internal, GuestOperationError, 502),
])
async def test_agent_error_kinds_become_typed_errors_with_their_status(kind, expected, status):
    link = FakeLink()
    link.answer = GuestOperationError("files_read", kind.value, "no such file: x")
    with pytest.raises(expected) as caught:
        await AgentClient(link).files_read("x")
    assert type(caught.value) is expected and caught.value.http_status == status


async def test_agent_event_handlers_that_raise_do_not_stop_the_others():
    link = FakeLink()
    agent = AgentClient(link)
    seen = []
    agent.on_event(lambda event: 1 / 0)
    agent.on_event(seen.append)
    link.on_event(ControlEvent("kernel_died", {"returncode": 1}))
    assert [e.name for e in seen] == ["kernel_died"]


async def test_an_agent_answer_with_bad_base64_is_a_protocol_error():
    from interpreter.errors import GuestProtocolError

    link = FakeLink()
    link.answer = {"data": "not base64!"}
    with pytest.raises(GuestProtocolError):
        await AgentClient(link).files_read("x")
