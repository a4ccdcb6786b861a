"""The egress proxy: an asyncio HTTP/1.1 forward proxy, one instance per session, serving the
streams the guest opens over its egress port (egress.py) under the session's policy (policy.py).

- `CONNECT host:port` (HTTPS and anything else tunnelled): checked, connected, then bytes both ways.
- absolute-form requests (`GET http://host:port/path HTTP/1.1`): checked, sent upstream in origin
  form with the URL's Host, hop-by-hop headers dropped, the matching entry's headers injected
  (replacing same-named ones the guest sent), `Connection: close`; the body passes with its own
  framing (Content-Length or chunked), the response passes through with `Connection: close`.
  One request per connection.
- Names are resolved here, on the host (loop.getaddrinfo: off the IO loop), every address they
  resolve to is checked, and the proxy connects to a checked address itself: a name cannot resolve
  to a public address for the check and an internal one for the connect (DNS rebinding).
- Refusals are 403 with a text body and an `X-Vmcell-Rule` header naming the rule (`not-allowed`,
  `internal-address`), logged with the session id; malformed requests 400, upstream failures 502,
  timeouts 504.

Both ends are "connections" with the same small interface (read, readuntil, readexactly, send,
send_eof, close): the guest's stream (egress.MuxStream) and the upstream TCP socket (TcpConn), so
the proxy can be driven by plain sockets in tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import urllib.parse
from dataclasses import dataclass

from .policy import AllowEntry, NetworkPolicy

log = logging.getLogger("vmcell.network")

HEAD_LIMIT = 64 * 1024  # request or response head, bytes
HEAD_TIMEOUT_S = 60.0  # for the guest to send its request head
RESOLVE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
RESPONSE_HEAD_TIMEOUT_S = 300.0  # for the upstream server to start answering
TUNNEL_LINGER_S = 30.0  # once the upstream side of a tunnel ended, for the guest's side to end too
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
                        "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length", "host"})
_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 502: "Bad Gateway", 504: "Gateway Timeout"}


class TcpConn:
    """An asyncio TCP connection behind the proxy's connection interface."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self.read = reader.read
        self.readexactly = reader.readexactly

    async def readuntil(self, separator: bytes) -> bytes:
        return await self._reader.readuntil(separator)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def send_eof(self) -> None:
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass


class HttpError(Exception):
    """An answer to the guest instead of a connection: status, rule (for 403s), message."""

    def __init__(self, status: int, message: str, rule: str | None = None):
        super().__init__(message)
        self.status, self.rule = status, rule


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    host: str = ""
    port: int = 0
    path: str = "/"

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"

    def describe(self) -> str:
        return f"CONNECT {self.target}" if self.method == "CONNECT" else f"{self.method} {self.target}"


def _split_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The first line and the header fields of a head ending in CRLF CRLF (ValueError if malformed)."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line or line[0] in " \t":
            raise ValueError("obsolete line folding in a header")
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or any(c in name for c in " \t()<>@,;\\\"/[]?={}"):
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return lines[0], headers


def parse_authority(text: str, default_port: int | None = None) -> tuple[str, int]:
    """host:port (or [v6]:port) -> (lowercased host, port); ValueError if malformed."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"malformed authority {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        ipaddress.IPv6Address(host)
    else:
        host, _, port_text = text.partition(":")
        rest = ":" + port_text if _ else ""
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise ValueError(f"malformed port in {text!r}")
        port = int(rest[1:])
    elif default_port is not None:
        port = default_port
    else:
        raise ValueError(f"{text!r} needs a port")
    host = host.lower().rstrip(".")
    if not 1 <= port <= 65535 or not host or any(c in host for c in " \t/@\\?#%"):
        raise ValueError(f"malformed authority {text!r}")
    if not host.replace(".", "").replace("-", "").replace("_", "").replace(":", "").isalnum() or not host.isascii():
        raise ValueError(f"malformed host {host!r}")
    return host, port


def parse_request(head: bytes) -> Request:
    """A proxy request head -> Request; HttpError 400 for anything else."""
    try:
        line, headers = _split_head(head)
        method, target, version = line.split(" ")
    except ValueError as exc:
        raise HttpError(400, f"malformed request head ({exc})") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha() or not method.isupper():
        raise HttpError(400, f"malformed request line {line[:200]!r}")
    request = Request(method, target, version, headers)
    try:
        if method == "CONNECT":
            request.host, request.port = parse_authority(target)
            return request
        if target.startswith("/") or target == "*":
            raise HttpError(400, "this is the egress proxy: send absolute-form requests (http://host/path) to it, "
                                 "as HTTP_PROXY clients do")
        url = urllib.parse.urlsplit(target)
        if url.scheme.lower() == "https":
            raise HttpError(400, "https:// URLs go through the proxy with CONNECT (HTTPS_PROXY)")
        if url.scheme.lower() != "http":
            raise HttpError(400, f"unsupported URL scheme {url.scheme!r} (http:// or CONNECT)")
        request.host, request.port = parse_authority(url.netloc.rpartition("@")[2], default_port=80)
    except ValueError as exc:
        raise HttpError(400, f"malformed request target {target[:200]!r}: {exc}") from None
    request.path = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
    return request


def _answer_bytes(status: int, message: str, rule: str | None) -> bytes:
    body = f"vmcell egress proxy: {message}\n".encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close"]
    if rule:
        head.append(f"X-Vmcell-Rule: {rule}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    return {t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")}


async def _pipe(src, dst) -> None:
    while True:
        data = await src.read(CHUNK)
        if not data:
            await dst.send_eof()
            return
        await dst.send(data)


class EgressProxy:
    """One session's proxy. `serve(conn)` handles one guest connection to the end (and closes it)."""

    def __init__(self, policy: NetworkPolicy, session_id: str, resolve=None, connect=None, on_refuse=None):
        self.policy, self.session_id = policy, session_id
        self.on_refuse = on_refuse  # called with the rule of every refusal (metrics)
        self._resolve_fn = resolve
        self._connect_fn = connect or self._open_tcp
        self.refused = 0
        self.served = 0

    async def serve(self, client) -> None:
        try:
            await self._serve(client)
        except HttpError as exc:
            await self._answer(client, exc)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass  # either side went away
        finally:
            await client.close()

    async def _serve(self, client) -> None:
        try:
            head = await asyncio.wait_for(client.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"request head larger than {HEAD_LIMIT} bytes") from None
        except asyncio.IncompleteReadError:
            return  # the guest closed before sending a request
        except asyncio.TimeoutError:
            raise HttpError(408, f"no complete request head within {HEAD_TIMEOUT_S:.0f}s") from None
        request = parse_request(head)
        entry = self.policy.match(request.host, request.port)
        if entry is None:
            raise self._refuse(request, "not-allowed",
                               f"{request.host}:{request.port} is not on this session's network allow list")
        upstream = await self._reach(request)
        self.served += 1
        try:
            if request.method == "CONNECT":
                if entry.headers:
                    log.info("session %s: egress %s: the entry's headers are not injected into an HTTPS tunnel",
                             self.session_id, request.describe())
                await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await self._tunnel(client, upstream)
            else:
                await self._forward(client, upstream, request, entry)
        finally:
            await upstream.close()

    def _refuse(self, request: Request, rule: str, reason: str) -> HttpError:
        self.refused += 1
        if self.on_refuse is not None:
            self.on_refuse(rule)
        log.warning("session %s: egress refused %s (rule %s): %s", self.session_id, request.describe(), rule, reason)
        return HttpError(403, f"refused {request.describe()} (rule: {rule}): {reason}", rule)

    async def _answer(self, client, exc: HttpError) -> None:
        if exc.status != 403:
            log.info("session %s: egress answered %d: %s", self.session_id, exc.status, exc)
        try:
            await client.send(_answer_bytes(exc.status, str(exc), exc.rule))
        except (ConnectionError, OSError):
            pass

    # ---- where to ---------------------------------------------------------------------------

    async def _addresses(self, request: Request) -> list:
        try:
            return [ipaddress.ip_address(request.host)]
        except ValueError:
            pass
        try:
            if self._resolve_fn is not None:
                infos = await asyncio.wait_for(self._resolve_fn(request.host, request.port), RESOLVE_TIMEOUT_S)
            else:
                infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                    request.host, request.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), RESOLVE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HttpError(504, f"resolving {request.host} took over {RESOLVE_TIMEOUT_S:.0f}s") from None
        except (OSError, UnicodeError) as exc:
            raise HttpError(502, f"cannot resolve {request.host}: {exc}") from None
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise HttpError(502, f"{request.host} resolves to no address")
        return addresses

    async def _reach(self, request: Request):
        addresses = await self._addresses(request)
        for address in addresses:  # every one: a name must not lead inside by any of its addresses
            refusal = self.policy.address_refusal(address, request.port)
            if refusal is not None:
                named = "" if request.host == str(address) else f"{request.host} resolves to {address}: "
                raise self._refuse(request, "internal-address", named + refusal)
        failures, timed_out = [], False
        for address in addresses:
            try:
                return await asyncio.wait_for(self._connect_fn(str(address), request.port), CONNECT_TIMEOUT_S)
            except asyncio.TimeoutError:
                timed_out = True
                failures.append(f"{address}: no answer within {CONNECT_TIMEOUT_S:.0f}s")
            except OSError as exc:
                failures.append(f"{address}: {exc.strerror or exc}")
        raise HttpError(504 if timed_out else 502,
                        f"cannot connect to {request.host}:{request.port} ({'; '.join(failures)})")

    @staticmethod
    async def _open_tcp(host: str, port: int) -> TcpConn:
        reader, writer = await asyncio.open_connection(host, port, limit=HEAD_LIMIT)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return TcpConn(reader, writer)

    # ---- CONNECT ----------------------------------------------------------------------------

    async def _tunnel(self, client, upstream) -> None:
        up = asyncio.ensure_future(_pipe(client, upstream))
        down = asyncio.ensure_future(_pipe(upstream, client))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if down in done and not down.exception():
                await asyncio.wait({up}, timeout=TUNNEL_LINGER_S)  # the guest's side may still be closing
            elif up in done and not up.exception():
                await down  # the guest half-closed: the answer may still come
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    # ---- plain HTTP -------------------------------------------------------------------------

    async def _forward(self, client, upstream, request: Request, entry: AllowEntry) -> None:
        te = [v.strip().lower() for v in request.header("transfer-encoding")]
        lengths = request.header("content-length")
        if te and te != ["chunked"]:
            raise HttpError(501, f"unsupported Transfer-Encoding {', '.join(te)!r}")
        if te and lengths:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if len(set(lengths)) > 1 or lengths and not lengths[0].isdigit():
            raise HttpError(400, "malformed Content-Length")
        length = int(lengths[0]) if lengths else 0
        dropped = HOP_BY_HOP | _connection_tokens(request.headers)
        injected = {name.lower() for name, _ in entry.headers}
        headers = [(n, v) for n, v in request.headers if n.lower() not in dropped and n.lower() not in injected]
        headers = [("Host", request.authority), *headers, *entry.headers]
        if te:
            headers.append(("Transfer-Encoding", "chunked"))
        elif lengths:
            headers.append(("Content-Length", str(length)))
        headers.append(("Connection", "close"))
        if entry.headers:
            log.info("session %s: egress %s: injected headers %s", self.session_id, request.describe(),
                     ", ".join(n for n, _ in entry.headers))
        head = f"{request.method} {request.path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
        if any(v.lower() == "100-continue" for v in request.header("expect")) and (te or length):
            await client.send(b"HTTP/1.1 100 Continue\r\n\r\n")  # Expect is ours to answer: not sent upstream
        await upstream.send(head.encode("latin-1") + b"\r\n")
        if te:
            await self._copy_chunked(client, upstream)
        else:
            await self._copy_exactly(client, upstream, length)
        await self._relay_response(upstream, client)

    @staticmethod
    async def _copy_exactly(src, dst, n: int) -> None:
        while n > 0:
            data = await src.read(min(n, CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(data)
            await dst.send(data)

    async def _copy_chunked(self, src, dst) -> None:
        while True:
            try:
                line = await src.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise HttpError(400, "malformed chunked body") from None
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(400, "malformed chunk size") from None
            await dst.send(line)
            if size == 0:
                break
            await self._copy_exactly(src, dst, size)
            crlf = await src.readexactly(2)
            if crlf != b"\r\n":
                raise HttpError(400, "malformed chunked body")
            await dst.send(crlf)
        while True:  # trailers, up to the empty line
            line = await src.readuntil(b"\r\n")
            await dst.send(line)
            if line == b"\r\n":
                return

    async def _relay_response(self, upstream, client) -> None:
        while True:
            try:
                head = await asyncio.wait_for(upstream.readuntil(b"\r\n\r\n"), RESPONSE_HEAD_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise HttpError(504, f"the server sent no response within {RESPONSE_HEAD_TIMEOUT_S:.0f}s") from None
            except asyncio.LimitOverrunError:
                raise HttpError(502, f"response head larger than {HEAD_LIMIT} bytes") from None
            except asyncio.IncompleteReadError:
                raise HttpError(502, "the server closed the connection without a response") from None
            try:
                line, headers = _split_head(head)
                version, status = line.split(" ", 2)[:2]
                if not version.startswith("HTTP/1.") or not status.isdigit() or len(status) != 3:
                    raise ValueError(line[:100])
            except ValueError as exc:
                raise HttpError(502, f"malformed response from the server ({exc})") from None
            dropped = {"connection", "keep-alive", "proxy-connection"} | _connection_tokens(headers)
            kept = [(n, v) for n, v in headers if n.lower() not in dropped]
            interim = status.startswith("1") and status != "101"
            if not interim:
                kept.append(("Connection", "close"))
            await client.send((line + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in kept) + "\r\n").encode("latin-1"))
            if not interim:
                break
        while True:
            data = await upstream.read(CHUNK)
            if not data:
                return
            await client.send(data)
