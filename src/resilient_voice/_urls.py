"""Checks shared by every client that takes a ``base_url``; nothing here does I/O.

A base URL is configuration that often comes from an environment variable, and a careless one
can carry credentials (``https://AC...:token@api.twilio.com``): an error message that echoes it
would put the secret in logs and crash reports, so every message shows the URL with its userinfo
replaced. A plain ``http://`` URL to a remote host would send those credentials (Basic auth, a
Bearer key) unencrypted, so it is refused unless the caller opts in; loopback stays allowed for
tests and local fakes.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "check_request_security",
    "check_transport_security",
    "is_loopback_host",
    "redact_url",
    "split",
]

_REDACTED = "***"


def redact_url(url: object) -> str:
    """``url`` as text fit for a message: any ``user:password@`` replaced by ``***@``.

    Works on malformed input too (it never raises), since it is used to describe bad values.
    Non-strings are described by their type only.
    """
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    scheme, sep, rest = url.partition("://")
    # Without "://" the text is malformed and its parts unknowable: anything before an "@"
    # (short of a query or fragment) may be a secret, so all of it goes.
    stops = "/?#" if sep else "?#"
    if not sep:
        scheme, rest = "", url
    # The authority ends at the first "/", "?" or "#"; userinfo ends at its last "@".
    end = len(rest)
    for stop in stops:
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    authority = rest[:end]
    if "@" not in authority:
        return url
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}{_REDACTED}@{host}{rest[end:]}"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (as ``urlsplit(...).hostname`` gives it) names this machine.

    ``localhost`` and the loopback addresses (127.0.0.0/8, ``::1``) only: a name that merely
    resolves to loopback today is not trusted, since DNS can change.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport_security(
    parts: SplitResult, url: str, *, allow_insecure_http: bool, name: str = "base_url"
) -> None:
    """Refuse plain ``http://`` to a non-loopback host unless ``allow_insecure_http``.

    Raises:
        TypeError: ``allow_insecure_http`` is not a bool.
        ValueError: The URL is ``http://`` to a remote host and the caller did not opt in.
    """
    if not isinstance(allow_insecure_http, bool):
        raise TypeError(
            f"allow_insecure_http must be a bool, got {type(allow_insecure_http).__name__}"
        )
    if parts.scheme != "http" or allow_insecure_http:
        return
    if parts.hostname is not None and is_loopback_host(parts.hostname):
        return
    raise ValueError(
        f"{name} {redact_url(url)!r} is plain http:// to a non-loopback host: the credentials "
        "would cross the network unencrypted. Use https://, or pass allow_insecure_http=True "
        "if the path to that host is trusted (a TLS-terminating sidecar, a test network)"
    )


def check_request_security(scheme: str, host: str, url: str) -> None:
    """Refuse to send a request over plain ``http://`` to a non-loopback host.

    For adapters whose URLs are built by someone else (an official SDK's own ``base_url``),
    so that only the request itself can be checked.

    Raises:
        ValueError: ``scheme`` is ``http`` and ``host`` is not loopback.
    """
    if scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"refusing to send {redact_url(url)!r}: plain http:// to a non-loopback host would "
            "carry the credentials unencrypted. Use https://, or build the client with "
            "allow_insecure_http=True if the path to that host is trusted"
        )


def split(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or ``None`` when it cannot be parsed (a bad port, a bad IPv6 host)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # parsing the port is what raises for "host:abc"
    except ValueError:
        return None
    return parts
