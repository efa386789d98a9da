"""How the library's exceptions pickle: by their ``args`` and attributes, not by ``__init__``.

The exception tree of :mod:`resilient_voice.errors` and the exceptions adapters define outside
it (the transport's HTTP status error, ``testing.DropConnectionError``) pickle the same way, so
the one ``__reduce__`` body lives here, where all of them can import it.
"""

from __future__ import annotations

import copyreg
from typing import Any

__all__ = ["reduce_exception"]

_NEWOBJ: Any = copyreg.__newobj__  # type: ignore[attr-defined]  # missing from typeshed


def reduce_exception(exc: BaseException) -> tuple[Any, ...]:
    """Pickle ``exc`` by its ``args`` and ``__dict__``, never by calling ``__init__`` again.

    ``BaseException``'s own pickling calls ``cls(*args)``: that breaks for a constructor whose
    parameters are not its ``args`` (keyword-only fields, a message built from fields), and
    works for the rest only by accident. ``copyreg.__newobj__`` sets ``args`` through
    ``BaseException.__new__``; the instance dict (fields and ``__notes__``) is the state.
    """
    return (_NEWOBJ, (type(exc), *exc.args), dict(vars(exc)) or None)
