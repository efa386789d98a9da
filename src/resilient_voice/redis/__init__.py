"""Scale-out on Redis: one limit across every replica of a service.

:class:`RedisBackend` is the shared store (``store=backend``) of ``TokenBucket``, ``KeyedLimiter``
and the middleware and clients built on them. It needs the ``redis`` extra (coredis):
``pip install 'resilient-voice[redis]'``. See docs/scale-out.md.
"""

from __future__ import annotations

from resilient_voice.redis._backend import RedisBackend

__all__ = ["RedisBackend"]

RedisBackend.__module__ = __name__
