"""The link's wire format, and the host's parser of guest frames under random and mutated input."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interpreter.errors import GuestProtocolError
from interpreter.kernel.link import ControlEvent, ControlReply, parse_control
from vmcell_guest.wire import (
    MAX_FRAME_BYTES,
    Channel,
    FrameDecoder,
    ProtocolError,
    decode_control,
    decode_multipart,
    encode_control,
    encode_frame,
    encode_multipart,
)


def test_roundtrip_control_and_multipart_across_split_reads():
    data = encode_control({"id": 1, "ok": True, "result": {}}) + encode_multipart(Channel.IOPUB, [b"a", b"", b"xyz"])
    decoder = FrameDecoder()
    frames = [f for i in range(len(data)) for f in decoder.feed(data[i : i + 1])]  # one byte at a time
    assert [f.channel for f in frames] == [Channel.CONTROL, Channel.IOPUB]
    assert decode_control(frames[0].body) == {"id": 1, "ok": True, "result": {}}
    assert decode_multipart(frames[1].body) == [b"a", b"", b"xyz"]
    assert decoder.buffered == 0


def test_oversized_length_is_rejected_before_buffering():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="outside"):
        decoder.feed(struct.pack(">IB", MAX_FRAME_BYTES + 1, 0))
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">IB", 0, 0))


def test_unknown_channel_and_bad_multipart():
    with pytest.raises(ProtocolError, match="unknown channel"):
        FrameDecoder().feed(struct.pack(">IB", 1, 99))
    with pytest.raises(ProtocolError, match="add up"):
        decode_multipart(struct.pack(">HI", 1, 10) + b"short")
    with pytest.raises(ProtocolError):
        encode_frame(Channel.SHELL, b"x" * MAX_FRAME_BYTES)


@pytest.mark.parametrize("body", [b"[1]", b"\xff", b'{"id": "1", "ok": true, "result": {}}',
                                  b'{"id": 1, "ok": false, "error": {"type": 3}}', b'{"id": true, "ok": true, "result": {}}',
                                  b'{"id": 1, "ok": true, "result": []}'])
def test_malformed_control_replies(body):
    with pytest.raises(ProtocolError):
        parse_control(body)


def test_events_are_told_apart_from_replies():
    event = parse_control(b'{"event": "kernel_died", "returncode": 1}')
    assert event == ControlEvent("kernel_died", {"event": "kernel_died", "returncode": 1})
    with pytest.raises(ProtocolError):
        parse_control(b'{"event": 7}')


def test_guest_protocol_error_is_a_protocol_error():
    assert issubclass(GuestProtocolError, ProtocolError)


def _valid_frames():
    reply = st.builds(lambda i, ok: {"id": i, "ok": ok, ("result" if ok else "error"): {"type": "X", "message": "m"}},
                      st.integers(0, 2**31), st.booleans())
    control = reply.map(encode_control)
    multipart = st.builds(encode_multipart, st.sampled_from([Channel.SHELL, Channel.IOPUB]),
                          st.lists(st.binary(max_size=64), min_size=1, max_size=5))
    return st.lists(st.one_of(control, multipart), min_size=1, max_size=6).map(b"".join)


def _feed_all(data: bytes, cut_points: list[int]) -> None:
    decoder = FrameDecoder(max_frame_bytes=4096)
    cuts = sorted({c % (len(data) + 1) for c in cut_points} | {0, len(data)})
    for a, b in zip(cuts, cuts[1:]):
        for frame in decoder.feed(data[a:b]):
            if frame.channel == Channel.CONTROL:
                parse_control(frame.body)
            else:
                decode_multipart(frame.body)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=8))
def test_fuzz_random_bytes_only_raise_protocol_error(data, cuts):
    try:
        _feed_all(data, cuts)
    except ProtocolError:
        pass


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_frames(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.lists(st.integers(0, 4096), max_size=8), st.integers(0, 64))
def test_fuzz_mutated_frames_only_raise_protocol_error(data, flips, cuts, chop):
    mutated = bytearray(data)
    for pos, value in flips:
        mutated[pos % len(mutated)] = value
    try:
        _feed_all(bytes(mutated[: max(0, len(mutated) - chop)]), cuts)
    except ProtocolError:
        pass


def test_control_json_is_data_not_code():
    # Values with quotes and newlines survive exactly: the link never splices text into code.
    value = "it's \"quoted\"\nline2"
    (frame,) = FrameDecoder().feed(encode_control({"id": 1, "ok": True, "result": {"v": value}}))
    assert parse_control(frame.body) == ControlReply(1, True, {"v": value})
    assert json.loads(frame.body)["result"]["v"] == value
