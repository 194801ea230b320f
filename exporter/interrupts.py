"""Ctrl-C, SIGTERM and SIGHUP that are never lost.

Python runs a signal handler between any two bytecodes, also inside a ``__del__``, where an exception is
printed as "Exception ignored ..." and dropped: the export would go on as if nothing happened. The handler
therefore also records the signal, the unraisable hook stays quiet about it, and every stage boundary
re-raises what was recorded (``check``).
"""

from __future__ import annotations

import signal
import sys
from typing import Any


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so staging folders are cleaned up on the way out."""


_pending: list[BaseException] = []


def _handler(signum: int, frame: Any) -> None:
    exc: BaseException = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
    _pending.append(exc)
    raise exc


def _unraisable(hook):
    def quiet(unraisable) -> None:
        if isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            return  # recorded in _pending; check() raises it where it can be handled
        hook(unraisable)

    return quiet


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP through the recording handler (the CLI calls this once)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _handler)
    if not getattr(sys.unraisablehook, "_export_adapter", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
        sys.unraisablehook._export_adapter = True  # type: ignore[attr-defined]


def check() -> None:
    """Raise a signal that arrived where it could not be raised (inside a __del__)."""
    if _pending:
        raise _pending.pop(0)
