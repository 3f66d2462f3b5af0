"""A cooperative yield point for model work that runs outside the scheduler on the server's runner thread.

Every decoding mode is rows of the scheduler now. What still runs as a call of its own on the server's one
runner thread is scoring: the summarization game's scorer and ``classify``'s continuation scoring. Each
calls ``yield_point()`` between its batched forwards; the server's runner installs a hook there that runs
one scheduler step (admitting new requests, streaming their tokens), so other streams wait at most one of
those forwards between their tokens. Outside the server no hook is installed and ``yield_point()`` does
nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_local = threading.local()


def yield_point() -> None:
    hook = getattr(_local, "hook", None)
    if hook is not None:
        hook()


class installed:
    """``with installed(hook):`` — calls of ``yield_point()`` on this thread run ``hook`` (not nested)."""

    def __init__(self, hook: Callable[[], None]):
        self.hook = hook

    def __enter__(self):
        self.before = getattr(_local, "hook", None)
        _local.hook = self._once

    def _once(self) -> None:
        _local.hook = None  # a hook that itself reaches a yield point does not recurse
        try:
            self.hook()
        finally:
            _local.hook = self._once

    def __exit__(self, *exc):
        _local.hook = self.before
