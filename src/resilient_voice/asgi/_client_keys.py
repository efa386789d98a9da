"""How a client address becomes a rate-limit key: IPv4 as is, IPv6 by network prefix."""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["ClientKeys", "check_ipv6_prefix"]


def check_ipv6_prefix(value: Any) -> int:
    """Check the ``ipv6_prefix`` option: the prefix length IPv6 clients are keyed by."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ipv6_prefix must be an int, got {value!r}")
    if not 1 <= value <= 128:
        raise ValueError(f"ipv6_prefix must be in 1..128, got {value!r}")
    return value


class ClientKeys:
    """Turns a client address into its bucket key: IPv4 as is, IPv6 by network prefix.

    One host usually holds a whole /64, so keying IPv6 clients per address would give it
    2**64 buckets; an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, from a dual-stack socket)
    is the IPv4 client it names. Text that is not an address is kept as it is.
    """

    __slots__ = ("_shift", "_suffix")

    def __init__(self, prefix: int) -> None:
        self._shift = 128 - prefix
        self._suffix = f"/{prefix}"

    def __call__(self, text: str) -> str:
        if ":" not in text:
            return text
        try:
            address = ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return text
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if not self._shift:
            return str(address)
        network = int(address) >> self._shift << self._shift
        return str(ipaddress.IPv6Address(network)) + self._suffix
