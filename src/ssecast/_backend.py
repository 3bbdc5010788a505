"""The Backend protocol, and the in-memory backend every broadcaster starts with.

A backend assigns ids, keeps the long history and carries encoded events between
processes. The broadcaster keeps the rest: validation, encoding, a ring of recent
events for resume without I/O, and the fan-out to its own subscribers.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ssecast import _fork
from ssecast._event import Draft, Event

__all__ = ["Ahead", "Backend", "Deliver", "MemoryBackend", "ReportGap"]

Deliver = Callable[[Event], None]
"""What a backend calls with each event, in id order, one call at a time.

It runs only ssecast's own code and never blocks, so a backend may hold a lock of its own
across it. It raises [`BroadcasterClosedError`][ssecast.BroadcasterClosedError] once the
broadcaster is closed: a backend then stops delivering (and a `publish` that delivers in
place lets it through).
"""

ReportGap = Callable[[], None]
"""What a backend calls when events may have been lost before the next one it delivers.

For example, its reader fell so far behind that the events it had yet to read were
trimmed, or the store was reset. Every subscriber then gets an `ssecast.gap` event, and no
client resumes across the hole from the broadcaster's ring of recent events. It raises
[`BroadcasterClosedError`][ssecast.BroadcasterClosedError] once the broadcaster is closed.
"""


@dataclass(frozen=True, slots=True)
class Ahead:
    """What [`Backend.replay`][ssecast.Backend.replay] gives for an id not yet delivered here.

    The client saw that event through a faster process, and it is in the backend's
    history. The broadcaster holds the subscription until this process delivers it, or
    an event that comes after it (when it was lost meanwhile), and goes on live from
    there: no event twice, and a gap if events were lost.

    :ivar follows: tells whether an event id comes after the one the client saw.
    """

    follows: Callable[[str], bool]


@runtime_checkable
class Backend(Protocol):
    """What a [`Broadcaster`][ssecast.Broadcaster] needs from the system that carries its events.

    The contract, which the in-memory and Redis backends both follow
    (`tests/test_backend_contract.py` checks it, and a new backend is added there):

    - The broadcaster calls [`start`][ssecast.Backend.start] once, from its constructor,
      and [`listen`][ssecast.Backend.listen] once, before its first `subscribe`. Neither
      may be called with a lock held, and `start` connects to nothing, so a broadcaster
      made at import time survives a pre-forking server. A process that only publishes
      never listens.
    - Every event published through the backend after `listen` returned, by this
      process or any other, is passed to `deliver` exactly once, in id order, and
      never two calls at a time, unless it is lost: then `report_gap` is called before
      the next event is delivered. Before `listen`, a backend may deliver this
      process's own events (the memory backend does) or none (the Redis backend).
    - Ids are opaque strings free of CR, LF and NUL; they increase in delivery order and
      are never handed out twice, by any process or any fork of one.
    - No method blocks a running event loop: `apublish` and `aclose` do their I/O
      elsewhere, and nothing is kept per event loop that outlives it.
    - [`check`][ssecast.Backend.check] asks the store, bounded by a timeout;
      [`available`][ssecast.Backend.available] says, with no I/O, whether its last call
      reached it. Health checks and metrics use them.
    """

    def start(self, deliver: Deliver, report_gap: ReportGap) -> None:
        """Remember where to deliver events and report gaps; connect to nothing yet."""

    def listen(self) -> None:
        """Begin passing every event published anywhere on this backend to `deliver`.

        It may block (`asubscribe` calls it from a worker thread).

        :raises BackendUnavailableError: it could not connect; the broadcaster calls it
            again at the next `subscribe`.
        """

    def publish(self, draft: Draft) -> Event:
        """Assign `draft` an id, send it, and return the event it became.

        :raises BackendUnavailableError: it could not be sent; no subscriber will see it.
        """

    async def apublish(self, draft: Draft) -> Event:
        """Do what [`publish`][ssecast.Backend.publish] does without blocking the running loop."""

    def replay(
        self, after: str, until: str | None, channels: frozenset[str]
    ) -> list[Event] | Ahead | None:
        """Return the events on `channels` after id `after`, up to `until` included.

        The broadcaster asks only for ids that fell out of its own ring of recent events.
        It must not block for long: a slow answer holds up a subscriber, and a thread.

        :param until: the last id already delivered to this process; `None` means the
            point at which [`listen`][ssecast.Backend.listen] began delivering.
        :returns: an [`Ahead`][ssecast.Ahead] when `after` is in the history but newer than
            `until` (another process delivered it first); `None` when it is unknown,
            trimmed, or events after it may be lost: the broadcaster looks for it in its
            ring once more, and otherwise begins the stream with a gap.
        :raises BackendUnavailableError: the history could not be read.
        """

    def check(self) -> None:
        """Return if the store answers now; for health checks.

        It may block, for a few seconds at most (`acheck` calls it from a worker thread).

        :raises BackendUnavailableError: the store could not be reached, or did not answer
            in time.
        """

    @property
    def available(self) -> bool:
        """Whether the store answered the last call made to it; `True` before the first.

        It does no I/O, so metrics read it at every scrape.
        """

    def close(self) -> None:
        """Stop delivering and release connections and threads; also during a `listen`."""

    async def aclose(self) -> None:
        """Do what [`close`][ssecast.Backend.close] does without blocking the running event loop."""


class MemoryBackend:
    """Ids and delivery within one process; the default backend.

    It keeps no history of its own: the broadcaster's ring of `history` recent
    events is all there is, so older ids resume with a gap. Ids carry a prefix drawn
    for each process, so that an id from another process (a sibling worker forked from
    the same parent), an earlier run, or another broadcaster is never taken for one of
    its own.
    """

    def __init__(self) -> None:
        # Held across deliver(), which runs only ssecast's code, so that ids reach every
        # subscriber in increasing order. The lock order is in _broadcaster.py.
        self._lock = threading.Lock()
        self._prefix = _new_prefix()
        self._count = 0
        self._deliver: Deliver | None = None
        _fork.guard(self, self._lock, MemoryBackend._renew_prefix)

    def start(self, deliver: Deliver, report_gap: ReportGap) -> None:
        """Remember where to deliver; it never loses an event, so it never reports a gap."""
        self._deliver = deliver

    def listen(self) -> None:
        """Do nothing: every event is this process's own, delivered as it is published."""

    def publish(self, draft: Draft) -> Event:
        """Give the draft the next id and deliver it at once, in this thread."""
        deliver = self._deliver
        if deliver is None:
            raise RuntimeError("MemoryBackend.publish() called before start()")
        with self._lock:
            self._count += 1
            event = draft.stamp(f"{self._prefix}{self._count}")
            deliver(event)
        return event

    async def apublish(self, draft: Draft) -> Event:
        """Do what [`publish`][ssecast.MemoryBackend.publish] does, which never blocks the loop."""
        return self.publish(draft)

    def replay(self, after: str, until: str | None, channels: frozenset[str]) -> list[Event] | None:
        """Return `None`: beyond the broadcaster's ring there is no history."""
        return None

    def check(self) -> None:
        """Return: there is no store to reach."""

    @property
    def available(self) -> bool:
        """`True`: there is no store to lose."""
        return True

    def close(self) -> None:
        """Release nothing: there is no connection or thread."""

    async def aclose(self) -> None:
        """Do what [`close`][ssecast.MemoryBackend.close] does."""
        self.close()

    def _renew_prefix(self) -> None:
        """In a forked child: ids of its own, which its parent and siblings never gave."""
        self._prefix = _new_prefix()
        self._count = 0


def _new_prefix() -> str:
    return secrets.token_hex(4) + "-"
