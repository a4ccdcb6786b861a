"""Network units without VMs: the allow list, address classes, the egress decoder against malformed
frames, and the host's egress endpoint + proxy driven by a fake guest over a Unix socket."""

import asyncio
import ipaddress
import logging
import struct

import pytest

from interpreter.network.egress import EgressEndpoint
from interpreter.network.policy import InvalidNetwork, NetworkPolicy, classify
from interpreter.network.proxy import parse_request, HttpError
from vmcell_guest.egress_wire import (
    MAX_FRAME_BYTES,
    WINDOW_BYTES,
    EgressDecoder,
    EgressProtocolError,
    Kind,
    encode,
    encode_window,
    guest_marker,
    host_marker,
)

ip = ipaddress.ip_address


# ---- policy ---------------------------------------------------------------------------------


def test_entries_parse_to_canonical_forms():
    policy = NetworkPolicy.parse({"allow": ["PyPI.org", "*.Example.com:8443", "127.0.0.1:8080", "[::1]:9000",
                                            "8.8.8.8", {"host": "api.example.com", "headers": {"Authorization": "x"}}]})
    assert [e.text for e in policy.entries] == ["pypi.org", "*.example.com:8443", "127.0.0.1:8080", "[::1]:9000",
                                                "8.8.8.8", "api.example.com"]
    assert policy.public()["allow"][-1] == {"host": "api.example.com", "headers": {"Authorization": "<redacted>"}}
    assert policy.to_json()["allow"][-1]["headers"] == {"Authorization": "x"}
    assert NetworkPolicy.parse(policy.to_json()) == policy
    assert NetworkPolicy.parse(None) is None and NetworkPolicy.parse(False) is None
    assert NetworkPolicy.parse({"allow": []}).entries == ()


@pytest.mark.parametrize("value, words", [
    (True, "must be an object"),
    ({"allow": "pypi.org"}, "must be a list"),
    ({"allow": [], "deny": []}, "unknown keys"),
    ({"allow": ["*"]}, "'*'"),
    ({"allow": ["exa mple.com"]}, "'exa mple.com'"),
    ({"allow": ["a.*.com"]}, "wildcard"),
    ({"allow": ["host:0"]}, "port"),
    ({"allow": ["host:70000"]}, "port"),
    ({"allow": ["::1"]}, "brackets"),
    ({"allow": ["[nothost]:80"]}, "IPv6"),
    ({"allow": ["127.0.0.1"]}, "loopback"),
    ({"allow": ["169.254.169.254"]}, "metadata"),
    ({"allow": ["10.1.2.3"]}, "exact ip:port"),
    ({"allow": [42]}, "42"),
    ({"allow": [{"headers": {"A": "b"}}]}, "needs `host`"),
    ({"allow": [{"host": "a.com", "headers": {"Host": "b"}}]}, "belongs to the proxy"),
    ({"allow": [{"host": "a.com", "headers": {"X-A": "b\r\nEvil: 1"}}]}, "CR, LF"),
    ({"allow": [{"host": "a.com", "headers": {"bad name": "b"}}]}, "token"),
    ({"allow": [{"host": "a.com", "extra": 1}]}, "unknown keys"),
])
def test_bad_policies_name_the_entry(value, words):
    with pytest.raises(InvalidNetwork) as info:
        NetworkPolicy.parse(value)
    assert words in str(info.value)
    assert info.value.http_status == 400


def test_matching_prefers_the_most_specific_entry_and_default_ports():
    policy = NetworkPolicy.parse({"allow": ["*.example.com", {"host": "api.example.com", "headers": {"X-K": "1"}},
                                           "other.org:8080", "127.0.0.1:9000"]})
    assert policy.match("api.example.com", 443).headers == (("X-K", "1"),)
    assert policy.match("www.example.com", 80).kind == "wildcard"
    assert policy.match("a.b.example.com", 443).kind == "wildcard"
    assert policy.match("example.com", 443) is None  # *.domain is not the apex
    assert policy.match("evil-example.com", 443) is None
    assert policy.match("www.example.com", 8080) is None  # no port: 80 and 443 only
    assert policy.match("other.org", 8080) is not None and policy.match("other.org", 443) is None
    assert policy.match("127.0.0.1", 9000) is not None and policy.match("127.0.0.1", 9001) is None
    assert policy.match("localhost", 9000) is None  # a name never matches an ip entry


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("10.0.2.2", "private"), ("192.168.1.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("169.254.1.1", "link-local"),
    ("100.64.0.1", "CGNAT"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
    ("::1", "loopback"), ("fe80::1", "link-local"), ("fc00::1", "private"), ("::", "unspecified"),
    ("::ffff:127.0.0.1", "loopback (inside "), ("2002:a00:1::", "private (inside "),
    ("64:ff9b::a9fe:a9fe", "metadata (inside "),
    ("8.8.8.8", None), ("151.101.0.223", None), ("2606:4700:4700::1111", None),
])
def test_address_classes(address, kind):
    found = classify(ip(address))
    assert found == kind or kind and kind.endswith("(inside ") and found.startswith(kind), found


def test_internal_addresses_need_the_exact_ip_port_entry():
    policy = NetworkPolicy.parse({"allow": ["127.0.0.1:8080", "pypi.org"]})
    assert policy.address_refusal(ip("127.0.0.1"), 8080) is None
    assert "127.0.0.1:8081" in policy.address_refusal(ip("127.0.0.1"), 8081)
    assert "loopback" in policy.address_refusal(ip("::ffff:127.0.0.1"), 8080)
    assert "metadata" in policy.address_refusal(ip("169.254.169.254"), 80)
    assert policy.address_refusal(ip("151.101.0.223"), 443) is None


def test_template_spec_network_default_is_checked(tmp_path):
    from interpreter.errors import TemplateMissing
    from interpreter.templates import load_template

    base = 'vcpus = 1\nmemory_mib = 512\ndisk_mib = 128\n'
    (tmp_path / "good.toml").write_text(base + 'network = {allow = ["pypi.org", "127.0.0.1:3000"]}\n')
    (tmp_path / "bad.toml").write_text(base + 'network = {allow = ["127.0.0.1"]}\n')
    assert load_template("good", tmp_path).network == {"allow": ["pypi.org", "127.0.0.1:3000"]}
    with pytest.raises(TemplateMissing, match="loopback"):
        load_template("bad", tmp_path)


def test_proxy_request_parsing():
    r = parse_request(b"GET http://Example.com:8080/a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (r.host, r.port, r.path, r.authority) == ("example.com", 8080, "/a?b=1", "example.com:8080")
    r = parse_request(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n")
    assert (r.host, r.port) == ("::1", 443)
    for bad in (b"GET /path HTTP/1.1\r\n\r\n", b"GET https://a.com/ HTTP/1.1\r\n\r\n", b"CONNECT a.com HTTP/1.1\r\n\r\n",
                b"GET http://a.com/ HTTP/2\r\n\r\n", b"GET http://a.com/ HTTP/1.1\r\n folded\r\n\r\n",
                b"GET http://a b/ HTTP/1.1\r\n\r\n", b"GET ftp://a.com/ HTTP/1.1\r\n\r\n"):
        with pytest.raises(HttpError) as info:
            parse_request(bad)
        assert info.value.status == 400


# ---- the egress decoder ---------------------------------------------------------------------

NONCE = "0123456789abcdef" * 2


def test_decoder_syncs_on_the_marker_then_decodes_split_input():
    decoder = EgressDecoder(guest_marker(NONCE))
    stream = b"stale half frame \x00\x00\x00\x09" + guest_marker(NONCE) + encode(Kind.OPEN, 1) + \
        encode(Kind.DATA, 1, b"hello") + encode_window(1, 100)
    frames = []
    for i in range(len(stream)):
        frames += decoder.feed(stream[i:i + 1])
    assert [(f.kind, f.stream, f.payload) for f in frames] == [
        (Kind.OPEN, 1, b""), (Kind.DATA, 1, b"hello"), (Kind.WINDOW, 1, struct.pack(">I", 100))]
    assert decoder.discarded == len(b"stale half frame \x00\x00\x00\x09")
    # After the sync, a marker is data like any other (a DATA payload may hold anything).
    assert decoder.feed(encode(Kind.DATA, 1, guest_marker(NONCE)))[0].payload == guest_marker(NONCE)


@pytest.mark.parametrize("frame, words", [
    (struct.pack(">IBI", 4, 2, 1), "length"),
    (struct.pack(">IBI", MAX_FRAME_BYTES + 1, 2, 1), "length"),
    (struct.pack(">IBI", 0xFFFFFFFF, 2, 1), "length"),
    (struct.pack(">IBI", 5, 9, 1), "unknown frame kind"),
    (struct.pack(">IBI", 5, 2, 1), "empty DATA"),
    (struct.pack(">IBI", 5, 1, 0), "stream id 0"),
    (struct.pack(">IBI", 6, 1, 1) + b"x", "carries a payload"),
    (struct.pack(">IBI", 7, 5, 1) + b"xy", "4 bytes"),
    (struct.pack(">IBIi", 9, 5, 1, 0), "credit"),
    (struct.pack(">IBII", 9, 5, 1, WINDOW_BYTES + 1), "credit"),
])
def test_decoder_rejects_malformed_frames(frame, words):
    decoder = EgressDecoder(None)
    with pytest.raises(EgressProtocolError, match=words):
        decoder.feed(frame)
    with pytest.raises(EgressProtocolError):  # and stays failed
        decoder.feed(encode(Kind.OPEN, 1))


def test_decoder_gives_up_without_a_marker():
    decoder = EgressDecoder(guest_marker(NONCE), max_discard=1000)
    with pytest.raises(EgressProtocolError, match="no sync marker"):
        for _ in range(10):
            decoder.feed(b"x" * 200)


# ---- the endpoint and the proxy, with a fake guest ------------------------------------------


class FakeGuest:
    """Plays the guest end of an egress socket: the `egress` op writes its marker; streams by hand."""

    def __init__(self, path):
        self.path = path
        self.conn = asyncio.get_running_loop().create_future()
        self.nonce = None

    async def start(self):
        self.server = await asyncio.start_unix_server(lambda r, w: self.conn.set_result((r, w)), str(self.path))

    async def egress(self, nonce):  # the agent op
        self.reader, self.writer = await self.conn
        self.nonce = nonce
        self.writer.write(b"junk of a previous host" + guest_marker(nonce))
        self.decoder = EgressDecoder(host_marker(nonce))
        return {"listen": "127.0.0.1:3128", "dropped": 0}

    def send(self, frame: bytes):
        self.writer.write(frame)

    async def frames(self, until_close_of: int | None = None, timeout: float = 10.0):
        out = []
        async def read():
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return
                for f in self.decoder.feed(data):
                    out.append(f)
                    if f.kind == Kind.CLOSE and f.stream == until_close_of:
                        return
        await asyncio.wait_for(read(), timeout)
        return out

    async def request(self, sid: int, raw: bytes, eof: bool = False) -> bytes:
        self.send(encode(Kind.OPEN, sid))
        for i in range(0, len(raw), 30000):
            self.send(encode(Kind.DATA, sid, raw[i:i + 30000]))
        if eof:  # the client half-closes (shutdown SHUT_WR): the answer still comes
            self.send(encode(Kind.EOF, sid))
        frames = await self.frames(until_close_of=sid)
        return b"".join(f.payload for f in frames if f.kind == Kind.DATA and f.stream == sid)

    async def close(self):
        self.server.close()
        if hasattr(self, "writer"):
            self.writer.close()


@pytest.fixture
async def web():
    """A loopback HTTP server recording what it got."""
    seen = []

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length) if length else b""
        if b"transfer-encoding: chunked" in head.lower():
            body = await reader.readuntil(b"0\r\n\r\n")
        seen.append((head, body))
        reply = b"hello from the host"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(reply), reply))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = server.sockets[0].getsockname()[1]
    server.seen = seen
    yield server
    server.close()


@pytest.fixture
async def egress(tmp_path, web):
    async def make(allow):
        guest = FakeGuest(tmp_path / "egress.sock")
        await guest.start()
        endpoint = EgressEndpoint("sess-1234", NetworkPolicy.parse({"allow": allow}))
        await endpoint.connect(guest.path, guest)
        made.append((guest, endpoint))
        return guest, endpoint
    made = []
    yield make
    for guest, endpoint in made:
        await endpoint.close()
        await guest.close()


async def test_allowed_request_passes_with_injected_headers_and_others_are_refused(egress, web, caplog):
    guest, endpoint = await egress([{"host": f"127.0.0.1:{web.port}", "headers": {"Authorization": "Bearer s3cret"}}])
    answer = await guest.request(1, f"GET http://127.0.0.1:{web.port}/x HTTP/1.1\r\nHost: evil\r\n"
                                    "authorization: guest-value\r\nProxy-Connection: keep-alive\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"hello from the host")
    assert b"Connection: close" in answer and b"keep-alive" not in answer
    head = web.seen[0][0].decode()
    assert head.startswith("GET /x HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{web.port}" in head and "evil" not in head
    assert "Authorization: Bearer s3cret" in head and "guest-value" not in head and "Proxy-" not in head
    with caplog.at_level(logging.WARNING, logger="vmcell.network"):
        refused = await guest.request(2, f"GET http://127.0.0.1:{web.port + 1}/ HTTP/1.1\r\n\r\n".encode())
    assert refused.startswith(b"HTTP/1.1 403 Forbidden") and b"X-Vmcell-Rule: not-allowed" in refused
    assert b"rule: not-allowed" in refused and b"s3cret" not in refused
    assert any("sess-1234" in r.getMessage() and "not-allowed" in r.getMessage() for r in caplog.records)
    assert len(web.seen) == 1


async def test_names_resolving_inside_are_refused(egress, web):
    guest, endpoint = await egress([f"localhost:{web.port}"])
    refused = await guest.request(1, f"GET http://localhost:{web.port}/ HTTP/1.1\r\n\r\n".encode())
    assert b"403" in refused.split(b"\r\n")[0] and b"internal-address" in refused
    assert b"localhost resolves to 127.0.0.1" in refused or b"localhost resolves to ::1" in refused
    assert web.seen == []


async def test_every_resolved_address_is_checked(tmp_path, web):
    guest = FakeGuest(tmp_path / "egress.sock")
    await guest.start()
    endpoint = EgressEndpoint("sess-1", NetworkPolicy.parse({"allow": [f"rebind.example:{web.port}"]}))

    async def resolve(host, port):  # a public address first, an internal one second
        return [(2, 1, 6, "", ("93.184.216.34", port)), (2, 1, 6, "", ("127.0.0.1", port))]
    endpoint.proxy._resolve_fn = resolve
    await endpoint.connect(guest.path, guest)
    try:
        refused = await guest.request(1, f"GET http://rebind.example:{web.port}/ HTTP/1.1\r\n\r\n".encode())
        assert b"403" in refused.split(b"\r\n")[0] and b"rebind.example resolves to 127.0.0.1" in refused
    finally:
        await endpoint.close()
        await guest.close()


async def test_connect_tunnel_and_chunked_body(egress, web):
    guest, endpoint = await egress([f"127.0.0.1:{web.port}"])
    answer = await guest.request(1, f"CONNECT 127.0.0.1:{web.port} HTTP/1.1\r\n\r\n".encode()
                                 + b"GET /t HTTP/1.1\r\nHost: a\r\n\r\n", eof=True)
    assert answer.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    answer = await guest.request(2, f"POST http://127.0.0.1:{web.port}/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    "5\r\nhello\r\n0\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert web.seen[-1][1] == b"5\r\nhello\r\n0\r\n\r\n"


async def test_large_bodies_respect_the_window(egress, web):
    guest, endpoint = await egress([f"127.0.0.1:{web.port}"])
    body = b"x" * (WINDOW_BYTES * 3)
    guest.send(encode(Kind.OPEN, 1))
    guest.send(encode(Kind.DATA, 1, f"POST http://127.0.0.1:{web.port}/big HTTP/1.1\r\n"
                                    f"Content-Length: {len(body)}\r\n\r\n".encode()))
    sent, credit = 0, WINDOW_BYTES - 200
    frames = []
    while sent < len(body):  # send only what the host granted
        n = min(credit, 30000, len(body) - sent)
        if n > 0:
            guest.send(encode(Kind.DATA, 1, body[sent:sent + n]))
            sent, credit = sent + n, credit - n
            continue
        for f in await guest.frames_until_window():
            frames.append(f)
            if f.kind == Kind.WINDOW:
                credit += f.credit
    frames += await guest.frames(until_close_of=1)
    assert b"".join(f.payload for f in frames if f.kind == Kind.DATA).startswith(b"HTTP/1.1 200 OK")
    assert web.seen[-1][1] == body


async def _frames_until_window(self, timeout=10.0):
    while True:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        frames = self.decoder.feed(data)
        if any(f.kind == Kind.WINDOW for f in frames):
            return frames

FakeGuest.frames_until_window = _frames_until_window


@pytest.mark.parametrize("frames, words", [
    ([encode(Kind.OPEN, 2), encode(Kind.OPEN, 1)], "not above"),
    ([encode(Kind.DATA, 7, b"x")], "never opened"),
    ([encode(Kind.OPEN, 1), encode_window(1, 1)], "past"),
    ([encode(Kind.OPEN, 1), *[encode(Kind.DATA, 1, b"x" * 30000)] * 9], "window"),
    ([struct.pack(">IBI", 5, 77, 1)], "unknown frame kind"),
])
async def test_a_guest_breaking_the_protocol_loses_its_egress(egress, frames, words, caplog):
    guest, endpoint = await egress(["example.com"])
    with caplog.at_level(logging.WARNING, logger="vmcell.network"):
        for frame in frames:
            guest.send(frame)
        await guest.writer.drain()
        await guest.frames(timeout=10)  # ends when the host closes the socket
    assert not endpoint.active and words in endpoint.failure
    assert any("sess-1234" in r.getMessage() and "egress closed" in r.getMessage() for r in caplog.records)


async def test_streams_past_the_cap_are_closed_at_once(egress):
    from vmcell_guest.egress_wire import MAX_STREAMS

    guest, endpoint = await egress(["example.com"])
    for sid in range(1, MAX_STREAMS + 2):
        guest.send(encode(Kind.OPEN, sid))
    frames = await guest.frames(until_close_of=MAX_STREAMS + 1)
    assert [f.stream for f in frames if f.kind == Kind.CLOSE] == [MAX_STREAMS + 1]
    assert endpoint.active and len(endpoint.streams) == MAX_STREAMS
