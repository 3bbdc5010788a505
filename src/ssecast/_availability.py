"""Whether a backend's store answered its last call, and the log lines when that changes."""

from __future__ import annotations

import logging
import threading

from ssecast import _fork
from ssecast._exceptions import BackendUnavailableError

__all__ = ["Availability"]

logger = logging.getLogger("ssecast")


class Availability:
    """A store's reachability as the last call found it; each change is logged once.

    An outage gives one WARNING, when the first call fails, and one INFO, when a call
    succeeds again, however many calls fail in between: each caller gets its exception,
    and the log is for operators, who need the change, not every retry.

    :param name: what the log lines call the backend; it names no host nor password.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        # A leaf lock (see the table in _broadcaster.py): the state, so that one change is
        # logged once. Never held while logging.
        self._lock = threading.Lock()
        self._up = True
        self._closed = False
        _fork.guard(self, self._lock, lambda _: None)

    @property
    def up(self) -> bool:
        """Whether the last call reached the store (`True` before the first); no I/O."""
        return self._up

    def succeeded(self) -> None:
        """Note a call that reached the store; log if it was unreachable until now."""
        with self._lock:
            changed = not (self._up or self._closed)
            if changed:
                self._up = True
        if changed:
            logger.info("%s is available again", self._name)

    def failed(self, error: BackendUnavailableError) -> None:
        """Note a call that failed with `error`; log if the store was reachable until now."""
        with self._lock:
            changed = self._up and not self._closed
            if changed:
                self._up = False
        if changed:
            logger.warning("%s is unavailable: %s", self._name, error)

    def close(self) -> None:
        """Note nothing more: calls that fail as the backend closes are no outage."""
        with self._lock:
            self._closed = True
