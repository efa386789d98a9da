"""Route patterns of the ASGI middlewares: exact paths, ``/prefix/*`` and ``{parameter}`` templates.

:class:`RouteMatcher` parses a pattern once and then answers, in time linear in the path, whether
a request path matches it. It lives apart from the rate limiter that uses it because it is a
parser and matcher with its own rules and tests, with nothing to do with limits or headers; it
stays importable from :mod:`resilient_voice.asgi._ratelimit`, where it was first defined.
"""

from __future__ import annotations

import re

from resilient_voice.asgi._common import normalise_path

__all__ = ["RouteMatcher"]

_PARAMETER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_]+)?\}")


class _Segment:
    """One template segment with ``{parameters}``: the literals around them, matched linearly.

    Each parameter takes at least one character and no ``/``; the literals are found left to
    right at their first possible place, which decides whether a match exists in one pass
    (a regular expression such as ``[^/]+-[^/]+\\.json`` would backtrack instead).
    """

    __slots__ = ("_first", "_last", "_middle", "_minimum")

    def __init__(self, literals: list[str]) -> None:
        self._first = literals[0]
        self._middle = tuple(literals[1:-1])
        self._last = literals[-1]
        self._minimum = sum(map(len, literals)) + len(literals) - 1

    def __call__(self, segment: str) -> bool:
        if len(segment) < self._minimum or not segment.startswith(self._first):
            return False
        position = len(self._first)
        for literal in self._middle:
            found = segment.find(literal, position + 1)
            if found < 0:
                return False
            position = found + len(literal)
        return segment.endswith(self._last) and len(segment) - len(self._last) > position


class RouteMatcher:
    """Decides whether a request path matches one rule: exact, prefix or template.

    - ``"/metrics"`` matches that path only;
    - ``"/vapi/*"`` matches every path that starts with ``/vapi/`` (and ``/vapi`` itself);
    - ``"/calls/{call_sid}/status"`` matches one segment (no ``/``) per ``{parameter}``; a
      ``{name:path}`` parameter matches the rest of the path, slashes included. A template
      may have one ``{name:path}`` parameter, as a whole segment.

    Patterns and paths are compared normalised (repeated and trailing slashes do not count,
    see :func:`~resilient_voice.asgi._common.normalise_path`), so ``/calls/1/transfer/`` is
    ``/calls/1/transfer``, as Litestar routes it. Templates are parsed once, here, into
    segments; matching walks the path's segments once, in linear time whatever the path.

    Raises:
        ValueError: a pattern that does not start with ``/``, a malformed template, or a
            ``{name:path}`` parameter that is not a whole segment or not the only one.
    """

    __slots__ = ("_exact", "_head", "_prefix", "_rest", "_tail", "pattern")

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            raise ValueError(f"route patterns must start with '/': {pattern!r}")
        self.pattern = pattern
        self._exact: str | None = None
        self._prefix: tuple[str, str] | None = None
        self._head: tuple[str | _Segment, ...] = ()
        self._tail: tuple[str | _Segment, ...] = ()
        self._rest: bool | None = None  # None: not a template; True: it has a {name:path}
        if "{" in pattern or "}" in pattern:
            self._parse(normalise_path(pattern))
        elif pattern.endswith("*"):
            prefix = normalise_path(pattern[:-1]) if len(pattern) > 2 else "/"
            whole = pattern[:-1].endswith("/") or prefix == "/"
            # "/vapi/*": "/vapi/..." and "/vapi" itself, which "/vapi/" normalises to.
            self._prefix = (prefix.rstrip("/") + "/", prefix) if whole else (prefix, prefix)
        else:
            self._exact = normalise_path(pattern)

    def _parse(self, pattern: str) -> None:
        head: list[str | _Segment] = []
        tail: list[str | _Segment] = []
        for text in pattern.split("/")[1:]:
            literals: list[str] = []
            position = 0
            rest = False
            for match in _PARAMETER.finditer(text):
                if match.group().endswith(":path}"):
                    if match.group() != text:
                        raise ValueError(
                            f"route template {self.pattern!r}: a {{name:path}} parameter must "
                            "be a whole segment"
                        )
                    if self._rest:
                        raise ValueError(
                            f"route template {self.pattern!r}: at most one {{name:path}} "
                            "parameter (two would make matching ambiguous and slow)"
                        )
                    rest = True
                literals.append(text[position : match.start()])
                position = match.end()
            literals.append(text[position:])
            if any("{" in literal or "}" in literal for literal in literals):
                raise ValueError(f"malformed route template: {self.pattern!r}")
            if rest:
                self._rest = True
                continue
            segment: str | _Segment = literals[0] if len(literals) == 1 else _Segment(literals)
            (tail if self._rest else head).append(segment)
        if self._rest is None:
            self._rest = False
        self._head = tuple(head)
        self._tail = tuple(tail)

    def __call__(self, path: str) -> bool:
        return self.matches(normalise_path(path))

    def matches(self, path: str) -> bool:
        """Like calling the matcher, for a path already normalised (the middleware's case)."""
        if self._exact is not None:
            return path == self._exact
        if self._prefix is not None:
            return path.startswith(self._prefix[0]) or path == self._prefix[1]
        segments = path.split("/")[1:]
        head, tail = self._head, self._tail
        if self._rest:
            # The {name:path} parameter takes the segments between head and tail, at least one.
            if len(segments) < len(head) + len(tail) + 1 or segments == [""]:
                return False
            if tail and not _fits(tail, segments[len(segments) - len(tail) :]):
                return False
            segments = segments[: len(head)]
        elif len(segments) != len(head):
            return False
        return _fits(head, segments)

    def __repr__(self) -> str:
        return f"RouteMatcher({self.pattern!r})"


def _fits(template: tuple[str | _Segment, ...], segments: list[str]) -> bool:
    for expected, segment in zip(template, segments, strict=True):
        if isinstance(expected, str):
            if expected != segment:
                return False
        elif not expected(segment):
            return False
    return True
