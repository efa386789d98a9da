"""One rule for believing forwarded headers, shared by every middleware of the package."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from resilient_voice import _validate
from resilient_voice.asgi._types import Scope

__all__ = ["Forwarded", "TrustedProxies", "as_trusted_proxies", "parse_address"]

# One RFC 7239 forwarded-pair: a token, "=", then a token or a quoted string.
_PAIR = re.compile(rb'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[^;,"\s]*)\s*')
_QUOTED_PAIR = re.compile(rb"\\(.)")
_CONFLICT = object()

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Forwarded:
    """What the nearest trusted proxy said about the request, or ``None`` where it said nothing.

    ``proto``, ``host`` and ``port`` are the right-most values (the ones the trusted proxy
    appended), raw bytes as received; ``conflict`` is set when the request carries both a
    ``Forwarded`` header and an ``X-Forwarded-*`` header for the same property and they
    disagree: one of them came from the client, and nothing tells which.
    """

    __slots__ = ("conflict", "host", "port", "proto")

    def __init__(
        self, proto: bytes | None, host: bytes | None, port: bytes | None, conflict: bool
    ) -> None:
        self.proto = proto
        self.host = host
        self.port = port
        self.conflict = conflict


class TrustedProxies:
    """The proxies whose forwarded headers the middleware believe, and how.

    One object serves ``TwilioSignatureMiddleware``, ``VapiWebhookMiddleware`` and
    ``RateLimitMiddleware`` alike (``trusted_proxies=``); a plain list of networks is shorthand
    for ``TrustedProxies(networks)``.

    **Networks** (the default mode). ``X-Forwarded-For``/``-Proto``/``-Host``/``-Port`` and
    ``Forwarded`` (RFC 7239) are read only when the connecting peer is in ``networks``, and then
    only the value that peer appended (the right-most one): anything to its left came from
    further away, the client included. The peer is ``scope["client"]``, with one correction:
    a server may already have replaced that with a forwarded address (uvicorn does so by default
    for peers on 127.0.0.1 and ::1). A connection to a loopback address can only come from this
    host, so when ``scope["server"]`` is a loopback address and ``scope["client"]`` is not, the
    peer was the local loopback address and is judged as such.

    **Server applied** (``server_applied=True``). The server has already applied the forwarded
    headers it trusts (uvicorn ``--proxy-headers --forwarded-allow-ips=...``, hypercorn's
    ``ProxyFixMiddleware``): the scope's client, scheme and ``Host`` are taken as the server left
    them and no forwarded header is read at all. The server's own list decides who is trusted.

    ``"*"``, networks that contain every address (``0.0.0.0/0``, ``::/0``) and networks with
    host bits set (``10.0.0.1/8``, usually a typo) are refused: each would let clients choose
    what the middleware believes.

    Args:
        networks: Addresses (``"10.0.0.7"``) and networks (``"10.0.0.0/8"``) of your proxies.
        server_applied: The server applies forwarded headers itself; read none.

    Raises:
        ValueError: an entry that is not an address or network, a refused entry, or networks
            together with ``server_applied=True``.
        TypeError: ``networks`` is a single string or holds something other than strings.
    """

    __slots__ = ("_exact", "_exact_text", "_networks", "_server_applied", "_text")

    def __init__(self, networks: Iterable[str] = (), *, server_applied: bool = False) -> None:
        if isinstance(networks, str | bytes) or not isinstance(networks, Iterable):
            raise TypeError(f"networks must be a collection of addresses, got {networks!r}")
        exact: set[Address] = set()
        nets: list[Network] = []
        text: list[str] = []
        for entry in networks:
            if not isinstance(entry, str):
                raise TypeError(f"trusted proxy entries must be strings, got {entry!r}")
            network = _network(entry)
            text.append(str(network) if network.num_addresses > 1 else entry.strip())
            if network.num_addresses == 1:
                exact.add(network.network_address)
            else:
                nets.append(network)
        if server_applied and text:
            raise ValueError(
                "server_applied=True reads no forwarded header, so it takes no networks: "
                "list your proxies in the server's own setting (uvicorn --forwarded-allow-ips)"
            )
        self._exact = frozenset(exact)
        self._exact_text = frozenset(str(address) for address in exact)
        self._networks = tuple(nets)
        self._text = tuple(text)
        self._server_applied = _validate.flag("server_applied", server_applied)

    @property
    def networks(self) -> tuple[str, ...]:
        """The configured addresses and networks, as given (networks normalised)."""
        return self._text

    @property
    def server_applied(self) -> bool:
        """Whether the server applies forwarded headers itself (none is read here)."""
        return self._server_applied

    @property
    def _reads_headers(self) -> bool:
        """Whether forwarded headers are ever read (networks given, not server applied)."""
        return bool(self._text)

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self._text)!r}, server_applied={self.server_applied!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustedProxies):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[frozenset[Address], frozenset[Network], bool]:
        return self._exact, frozenset(self._networks), self._server_applied

    def _contains(self, address: Address) -> bool:
        """Whether ``address`` is one of the trusted proxies."""
        if address in self._exact:
            return True
        return any(address in network for network in self._networks)

    def _peer_is_trusted(self, scope: Scope) -> bool:
        """Whether the connecting peer is a trusted proxy whose forwarded headers count."""
        if not self._text:
            return False
        client = scope.get("client")
        peer: str | None = client[0] if client else None
        server = scope.get("server")
        if server and _is_loopback(server[0]) and (peer is None or not _is_loopback(peer)):
            # The server rewrote scope["client"]: the real peer was on this host, on loopback.
            peer = server[0]
        if peer is None:
            return False
        if peer in self._exact_text:
            return True
        address = parse_address(peer)
        return address is not None and self._contains(address)

    def _forwarded(self, scope: Scope) -> Forwarded | None:
        """The trusted proxy's view of scheme and host, or ``None`` when none is to be read."""
        if not self._peer_is_trusted(scope):
            return None
        x_proto: list[bytes] = []
        x_host: list[bytes] = []
        x_port: list[bytes] = []
        standard: list[bytes] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-proto":
                x_proto.append(value)
            elif name == b"x-forwarded-host":
                x_host.append(value)
            elif name == b"x-forwarded-port":
                x_port.append(value)
            elif name == b"forwarded":
                standard.append(value)
        proto = _last(x_proto)
        host = _last(x_host)
        port = _last(x_port)
        conflict = False
        if standard:
            element = _last_element(b",".join(standard))
            if element is None:
                return Forwarded(None, None, None, True)
            for key, current in ((b"proto", proto), (b"host", host)):
                value = element.get(key)
                if value is None:
                    continue
                if current is not None:
                    conflict = conflict or current.lower() != value.lower()
                elif key == b"proto":
                    proto = value
                else:
                    host = value
        return Forwarded(proto, host, port, conflict)

    def _forwarded_for(self, scope: Scope, hops: int) -> list[bytes] | None:
        """Up to ``hops`` client addresses the proxies recorded, nearest first, or ``None``.

        ``X-Forwarded-For`` entries, or ``Forwarded`` ``for=`` values; ``None`` when neither is
        present or both are and disagree on the nearest address (the client wrote one of them).
        """
        x_for = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
        standard = [value for name, value in scope["headers"] if name == b"forwarded"]
        from_x: list[bytes] | None = None
        if x_for:
            header = x_for[0] if len(x_for) == 1 else b",".join(x_for)
            parts = header.rsplit(b",", hops)
            from_x = [part.strip(b" \t") for part in reversed(parts[-hops:])]
        if not standard:
            return from_x
        from_standard = _for_values(b",".join(standard), hops)
        if from_x is None:
            return from_standard
        if from_standard is None or from_standard[:1] != from_x[:1]:
            return None
        return from_x


def as_trusted_proxies(value: TrustedProxies | Iterable[str] | None) -> TrustedProxies:
    """Accept ``trusted_proxies=`` as a :class:`TrustedProxies` or a list of networks."""
    if value is None:
        return TrustedProxies()
    if isinstance(value, TrustedProxies):
        return value
    if isinstance(value, str):
        if value == "*":
            raise ValueError(_STAR)
        return TrustedProxies([value])
    return TrustedProxies(value)


_STAR = (
    "trusted_proxies '*' would let any client choose the address, scheme and host the middleware "
    "believe: list your proxies' addresses or networks, or use "
    "TrustedProxies(server_applied=True) when the server applies forwarded headers itself"
)


def _network(entry: str) -> Network:
    if entry.strip() == "*":
        raise ValueError(_STAR)
    try:
        network = ipaddress.ip_network(entry.strip(), strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise ValueError(
                f"trusted proxy network {entry!r} has host bits set: write the network "
                f"address ({ipaddress.ip_network(entry.strip(), strict=False)}) or a single "
                "address"
            ) from None
        raise ValueError(f"trusted proxy {entry!r} is not an IP address or network") from None
    if network.prefixlen == 0:
        raise ValueError(
            f"trusted proxy network {entry!r} contains every address, so every client would be "
            "trusted: list your proxies' addresses or networks"
        )
    return network


def parse_address(text: Any) -> Address | None:
    """An IP address from text (an IPv4-mapped IPv6 address as IPv4), or ``None``."""
    if not isinstance(text, str):
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_loopback(text: Any) -> bool:
    """Whether an address, as servers write it, is a loopback address (127.0.0.0/8, ::1).

    Text only, no parsing: server addresses come from the server, and a client address that
    merely looks like loopback is still checked against the trusted networks afterwards.
    """
    return isinstance(text, str) and (
        text.startswith(("127.", "::ffff:127.")) or text in ("::1", "0:0:0:0:0:0:0:1")
    )


def _last(values: list[bytes]) -> bytes | None:
    """The right-most item of repeated, comma-separated header values, stripped."""
    if not values:
        return None
    item = values[-1].rsplit(b",", 1)[-1].strip(b" \t")
    return item or None


def _elements(value: bytes) -> list[dict[bytes, bytes]] | None:
    """Parse a ``Forwarded`` value into its elements (left to right); ``None`` if malformed."""
    elements: list[dict[bytes, bytes]] = [{}]
    position = 0
    end = len(value)
    while position < end:
        if value[position] in b" \t":
            position += 1
            continue
        if value[position : position + 1] == b",":
            elements.append({})
            position += 1
            continue
        if value[position : position + 1] == b";":
            position += 1
            continue
        match = _PAIR.match(value, position)
        if match is None:
            return None
        key = match.group(1).lower()
        raw = match.group(2)
        if raw.startswith(b'"'):
            raw = _QUOTED_PAIR.sub(rb"\1", raw[1:-1])
        if key in elements[-1]:
            return None  # RFC 7239: a parameter occurs at most once per element
        elements[-1][key] = raw
        position = match.end()
    return elements


def _last_element(value: bytes) -> dict[bytes, bytes] | None:
    elements = _elements(value)
    if not elements:
        return None
    return elements[-1]


def _for_values(value: bytes, hops: int) -> list[bytes] | None:
    elements = _elements(value)
    if elements is None:
        return None
    found: list[bytes] = []
    for element in reversed(elements[-hops:]):
        node = element.get(b"for")
        if node is None:
            return found or None
        found.append(_node_address(node))
    return found or None


def _node_address(node: bytes) -> bytes:
    """The address of an RFC 7239 node (``1.2.3.4``, ``1.2.3.4:80``, ``[2001:db8::1]:80``)."""
    if node.startswith(b"["):
        closing = node.find(b"]")
        return node[1:closing] if closing > 0 else node
    if node.count(b":") == 1:
        return node.split(b":", 1)[0]
    return node
