"""The Backend protocol, and the in-memory backend every broadcaster starts with.

A backend assigns ids, keeps the long history and carries encoded events between
processes. The broadcaster keeps the rest: validation, encoding, a ring of recent
events for resume without I/O, and the fan-out to its own subscribers.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ssecast._event import Draft, Event

__all__ = ["Backend", "Deliver", "MemoryBackend"]

Deliver = Callable[[Event], None]
"""What a backend calls with each event, in id order, one call at a time.

It raises :class:`~ssecast.BroadcasterClosedError` once the broadcaster is closed: a
backend then stops delivering (and a ``publish`` that delivers in place lets it through).
"""


@runtime_checkable
class Backend(Protocol):
    """What a :class:`~ssecast.Broadcaster` needs from the system that carries its events.

    The contract, which the in-memory and Redis backends both follow:

    - The broadcaster calls each of :meth:`start` and :meth:`listen` once, lazily:
      ``start`` before its first ``publish`` or ``subscribe``, ``listen`` before its
      first ``subscribe`` (never in a constructor, so a broadcaster made at import time
      survives a pre-forking server). A process that only publishes never listens.
    - Every event published through the backend after ``listen`` returned, by this
      process or any other, is passed to ``deliver`` exactly once, in id order, and
      never two calls at a time. Before that, a backend may deliver this process's own
      events (the memory backend does) or none (the Redis backend).
    - Ids are opaque strings free of CR, LF and NUL, and increase in delivery order.
    """

    def start(self, deliver: Deliver) -> None:
        """Remember to pass events to ``deliver``; connect to nothing yet."""

    def listen(self) -> None:
        """Begin passing every event published anywhere on this backend to ``deliver``.

        It may block (``asubscribe`` calls it from a worker thread).

        :raises BackendUnavailableError: it could not connect; the broadcaster calls it
            again at the next ``subscribe``.
        """

    def publish(self, draft: Draft) -> Event:
        """Assign ``draft`` an id, send it, and return the event it became.

        :raises BackendUnavailableError: it could not be sent; no subscriber will see it.
        """

    async def apublish(self, draft: Draft) -> Event:
        """Do what :meth:`publish` does without blocking the running event loop."""

    def replay(self, after: str, until: str | None, channels: frozenset[str]) -> list[Event] | None:
        """Return the events on ``channels`` after id ``after``, up to ``until`` included.

        The broadcaster asks only for ids that fell out of its own ring of recent events.

        :param until: the last id already delivered to this process; ``None`` means the
            point at which :meth:`listen` began delivering.
        :returns: ``None`` when ``after`` is unknown, trimmed, or newer than ``until`` (another
            process delivered it first); the broadcaster then looks for it in its ring once
            more, and otherwise begins the stream with a gap.
        :raises BackendUnavailableError: the history could not be read.
        """

    def close(self) -> None:
        """Stop delivering and release connections and threads."""

    async def aclose(self) -> None:
        """Do what :meth:`close` does without blocking the running event loop."""


class MemoryBackend:
    """Ids and delivery within one process; the default backend.

    It keeps no history of its own: the broadcaster's ring of ``history`` recent
    events is all there is, so older ids resume with a gap.
    """

    def __init__(self) -> None:
        # Reentrant: a logging handler that publishes (a live log viewer) may run inside
        # deliver(), which logs evictions; a plain lock would deadlock that thread.
        self._lock = threading.RLock()
        # Ids carry a per-instance prefix so an id from an earlier run of the process,
        # or from another broadcaster, is never mistaken for one of ours.
        self._prefix = secrets.token_hex(4) + "-"
        self._count = 0
        self._deliver: Deliver | None = None

    def start(self, deliver: Deliver) -> None:
        """Remember where to deliver."""
        self._deliver = deliver

    def listen(self) -> None:
        """Do nothing: every event is this process's own, delivered as it is published."""

    def publish(self, draft: Draft) -> Event:
        """Give the draft the next id and deliver it at once, in this thread."""
        deliver = self._deliver
        if deliver is None:
            raise RuntimeError("MemoryBackend.publish() called before start()")
        # Held across delivery so that ids reach every subscriber in increasing order.
        with self._lock:
            self._count += 1
            event = draft.stamp(f"{self._prefix}{self._count}")
            deliver(event)
        return event

    async def apublish(self, draft: Draft) -> Event:
        """Do what :meth:`publish` does; it never waits, so it never blocks the loop."""
        return self.publish(draft)

    def replay(self, after: str, until: str | None, channels: frozenset[str]) -> list[Event] | None:
        """Return ``None``: beyond the broadcaster's ring there is no history."""
        return None

    def close(self) -> None:
        """Release nothing: there is no connection or thread."""

    async def aclose(self) -> None:
        """Do what :meth:`close` does."""
        self.close()
