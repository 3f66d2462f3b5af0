"""A cooperative yield point for the decoding loops that still run outside the scheduler.

Speculative and contrastive decoding run as loops of their own. On the server they run on the one
thread that also drives the scheduler, so a long one would freeze every other stream until it ended.
Each of those loops calls ``yield_point()`` once per round; the server's runner installs a hook there
that runs one scheduler step (admitting new requests, streaming their tokens) between two rounds. Other
streams then wait at most one round of the driver between their tokens, not the driver's whole run.
Outside the server no hook is installed and ``yield_point()`` does nothing.
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
