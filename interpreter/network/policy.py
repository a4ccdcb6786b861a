"""A session's network policy: the allow list, parsed and checked, and what counts as internal.

    network = {"allow": [ENTRY, ...]}
    ENTRY   = "host" | "*.domain" | "host:port" | "*.domain:port" | "ip:port" | "[v6]:port" | "ip"
            | {"host": ENTRY-as-a-string, "headers": {"Name": "value", ...}}

- A name or wildcard without a port allows ports 80 and 443; `*.example.com` matches names under
  example.com (a.example.com, a.b.example.com), not example.com itself.
- A name is resolved on the host, and every address it resolves to must be public: loopback,
  link-local, private, CGNAT, multicast, reserved, unspecified, metadata (169.254.169.254,
  fd00:ec2::254) and such addresses inside IPv6 (IPv4-mapped, 6to4, Teredo, NAT64) are refused
  unless an entry names that exact ip:port. So an internal address needs an explicit `ip:port`
  entry (a bare internal ip is refused at parse time), and no name can lead to one.
- `headers`: added to plain-HTTP requests the entry allows, replacing same-named ones the guest
  sent. They stay on the host: `public()` shows them redacted.

Every problem is an InvalidNetwork (400) naming the entry.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import InvalidRequest

DEFAULT_PORTS = (80, 443)
MAX_ENTRIES = 256
MAX_HEADERS = 32
MAX_HEADER_VALUE = 8192
REDACTED = "<redacted>"

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the proxy owns (framing, routing, the hop): an entry may not set them.
_RESERVED_HEADERS = frozenset({"host", "connection", "content-length", "transfer-encoding", "te", "trailer",
                               "upgrade", "keep-alive", "proxy-connection", "proxy-authorization",
                               "proxy-authenticate", "expect"})
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidNetwork(InvalidRequest):
    """A `network` value that is not a valid policy (400; the message names the entry)."""


def classify(address: IPAddress) -> str | None:
    """Why an address is internal ("loopback", "private", ...), or None for a public one."""
    if address in METADATA:
        return "metadata"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = classify(embedded)
            return f"{inner} (inside {address})" if inner else None
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "CGNAT"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "non-global"
    return None


@dataclass(frozen=True)
class AllowEntry:
    kind: str  # "host", "wildcard" (host is the domain, without "*."), "ip"
    host: str
    port: int | None
    headers: tuple[tuple[str, str], ...] = ()
    text: str = ""  # the entry's host part as given (canonical)

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,) if self.port is not None else DEFAULT_PORTS

    def matches(self, host: str, port: int) -> bool:
        if port not in self.ports:
            return False
        if self.kind == "wildcard":
            return host.endswith("." + self.host)
        return host == self.host

    def specificity(self) -> tuple:
        return (self.kind != "wildcard", self.port is not None, len(self.host))

    def to_json(self, redact: bool = False):
        if not self.headers:
            return self.text
        return {"host": self.text, "headers": {k: REDACTED if redact else v for k, v in self.headers}}


def _fail(entry, message: str):
    raise InvalidNetwork(f"network.allow entry {entry!r}: {message}")


def _parse_port(entry, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        _fail(entry, f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def _parse_host(entry, text: str) -> AllowEntry:
    text = text.strip().lower()
    if not text:
        _fail(entry, "empty")
    port = None
    if text.startswith("["):  # [v6] or [v6]:port
        close = text.find("]")
        if close < 0:
            _fail(entry, "unclosed [")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                _fail(entry, "expected :port after ]")
            port = _parse_port(entry, rest[1:])
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            _fail(entry, f"{host!r} in brackets is not an IPv6 address")
        return _ip_entry(entry, address, port)
    if text.count(":") > 1:
        _fail(entry, "an IPv6 address goes in brackets: [2001:db8::1]:443")
    host, _, port_text = text.partition(":")
    if _:
        port = _parse_port(entry, port_text)
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is not None:
        return _ip_entry(entry, address, port)
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if "*" in name:
        _fail(entry, "a wildcard is only allowed as a leading `*.` (e.g. *.example.com)")
    if any(ord(c) > 127 for c in name):
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            _fail(entry, "not a valid internationalised domain name")
    name = name.rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        _fail(entry, "not a host name, *.domain, host:port or ip:port")
    if all(label.isdigit() for label in labels):
        _fail(entry, "not a valid IPv4 address")
    canonical = ("*." if wildcard else "") + name + (f":{port}" if port is not None else "")
    return AllowEntry("wildcard" if wildcard else "host", name, port, text=canonical)


def _ip_entry(entry, address: IPAddress, port: int | None) -> AllowEntry:
    internal = classify(address)
    if internal and port is None:
        _fail(entry, f"{address} is a {internal} address: only an exact ip:port entry allows one "
                     f"(e.g. {address}:8080)")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return AllowEntry("ip", str(address), port, text=shown + (f":{port}" if port is not None else ""))


def _parse_headers(entry, headers) -> tuple[tuple[str, str], ...]:
    if not isinstance(headers, dict) or not headers:
        _fail(entry, "`headers` must be a non-empty object of header names to values")
    if len(headers) > MAX_HEADERS:
        _fail(entry, f"at most {MAX_HEADERS} headers")
    seen, out = set(), []
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            _fail(entry, f"header name {name!r} is not a valid HTTP token")
        if name.lower() in _RESERVED_HEADERS:
            _fail(entry, f"header {name!r} belongs to the proxy and cannot be injected")
        if name.lower() in seen:
            _fail(entry, f"header {name!r} is given twice")
        if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE or any(c in value for c in "\r\n\0"):
            _fail(entry, f"the value of header {name!r} must be a string of at most {MAX_HEADER_VALUE} characters "
                         "without CR, LF or NUL")
        seen.add(name.lower())
        out.append((name, value))
    return tuple(out)


def parse_entry(entry) -> AllowEntry:
    if isinstance(entry, str):
        return _parse_host(entry, entry)
    if isinstance(entry, dict):
        shown = entry.get("host") if isinstance(entry.get("host"), str) else entry
        unknown = set(entry) - {"host", "headers"}
        if unknown:
            _fail(shown, f"unknown keys {sorted(unknown)} (an entry object has `host` and `headers`)")
        if not isinstance(entry.get("host"), str):
            _fail(shown, "an entry object needs `host`, a string")
        parsed = _parse_host(shown, entry["host"])
        if "headers" not in entry:
            return parsed
        return AllowEntry(parsed.kind, parsed.host, parsed.port, _parse_headers(shown, entry["headers"]), parsed.text)
    _fail(entry, "an entry is a string (host, *.domain, host:port, ip:port) or {host, headers}")


@dataclass(frozen=True)
class NetworkPolicy:
    entries: tuple[AllowEntry, ...]

    @classmethod
    def parse(cls, value) -> "NetworkPolicy | None":
        """`{"allow": [...]}` -> a policy; None or False -> no network. InvalidNetwork otherwise."""
        if value is None or value is False:
            return None
        if not isinstance(value, dict):
            raise InvalidNetwork("`network` must be an object {\"allow\": [...]} (or false for none)")
        unknown = set(value) - {"allow"}
        if unknown:
            raise InvalidNetwork(f"`network` has unknown keys {sorted(unknown)}; it takes `allow`")
        allow = value.get("allow")
        if not isinstance(allow, list):
            raise InvalidNetwork("`network.allow` must be a list of entries")
        if len(allow) > MAX_ENTRIES:
            raise InvalidNetwork(f"`network.allow` has {len(allow)} entries; at most {MAX_ENTRIES}")
        return cls(tuple(parse_entry(e) for e in allow))

    def to_json(self) -> dict:
        """Everything, secrets included (the registry's record; parse() reads it back)."""
        return {"allow": [e.to_json() for e in self.entries]}

    def public(self) -> dict:
        """What the API shows: header values redacted."""
        return {"allow": [e.to_json(redact=True) for e in self.entries]}

    def match(self, host: str, port: int) -> AllowEntry | None:
        """The most specific entry allowing host:port (host: lowercased name, or an IP's str)."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            host = str(address)
            found = [e for e in self.entries if e.kind == "ip" and e.matches(host, port)]
        else:
            host = host.rstrip(".")
            found = [e for e in self.entries if e.kind != "ip" and e.matches(host, port)]
        return max(found, key=AllowEntry.specificity, default=None)

    def address_refusal(self, address: IPAddress, port: int) -> str | None:
        """Why the proxy may not connect to this address (None: it may)."""
        internal = classify(address)
        if internal is None:
            return None
        if any(e.kind == "ip" and e.port == port and e.host == str(address) for e in self.entries):
            return None
        return (f"{address} is a {internal} address; only an entry naming exactly "
                f"{'[%s]' % address if address.version == 6 else address}:{port} allows it")
