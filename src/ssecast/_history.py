"""A bounded ring of recent events, for `Last-Event-ID` resume without I/O."""

from __future__ import annotations

from collections import deque
from itertools import islice

from ssecast._event import Event

__all__ = ["History"]


class History:
    """The last `size` events, in delivery order, found by id in constant time.

    Not thread-safe: the broadcaster calls it under its lock.
    """

    __slots__ = (
        "_boundary",
        "_caught_up",
        "_events",
        "_forgotten_at",
        "_positions",
        "_total",
        "last_id",
    )

    def __init__(self, size: int) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        # id -> position counted from the first event ever appended.
        self._positions: dict[str, int] = {}
        # The id of the newest forgotten event: every event after it is still kept, so a
        # client that saw it can still resume without a gap.
        self._boundary: str | None = None
        self._total = 0
        # The mark at the last forget(): events may be missing right after it.
        self._forgotten_at = -1
        self.last_id: str | None = None
        """The id of the newest event appended, kept even when `size` is 0 or forgotten."""
        # The id a client may hold to be told it missed nothing: the newest, unless events
        # were lost after it.
        self._caught_up: str | None = None

    def append(self, event: Event) -> None:
        """Remember `event`, forgetting the oldest one when full."""
        events = self._events
        if events.maxlen:
            if len(events) == events.maxlen:
                if self._boundary is not None:
                    # pop, not del: a backend may deliver an id twice, and the ring must
                    # not break on it.
                    self._positions.pop(self._boundary, None)
                self._boundary = events[0].id
            events.append(event)
            self._positions[event.id] = self._total
        self._total += 1
        self.last_id = self._caught_up = event.id

    @property
    def size(self) -> int:
        """How many events it keeps."""
        return self._events.maxlen or 0

    def forget(self) -> None:
        """Forget every event: some after them were lost, so no client may resume from them.

        `since` answers `None` for a bookmark taken before.
        """
        self._forgotten_at = self._total
        self._events.clear()
        self._positions.clear()
        self._boundary = None
        self._caught_up = None

    @property
    def mark(self) -> int:
        """A bookmark for `since`: how many events were ever appended."""
        return self._total

    def since(self, mark: int, channels: frozenset[str]) -> list[Event] | None:
        """Return the events on `channels` appended after `mark`, oldest first.

        :returns: `None` when some of them are no longer kept, or were lost.
        """
        start = len(self._events) - (self._total - mark)
        if start < 0 or mark <= self._forgotten_at:
            return None
        return [event for event in islice(self._events, start, None) if event.channel in channels]

    def after(self, event_id: str, channels: frozenset[str]) -> list[Event] | None:
        """Return the events after `event_id` on `channels`, oldest first.

        :returns: `None` when some event after `event_id` is no longer kept, or the id
            was never seen, so the caller cannot know what the client missed.
        """
        if event_id == self._caught_up:
            return []  # caught up, even when the ring keeps nothing (history=0)
        position = self._positions.get(event_id)
        if position is None:
            return None
        start = position - (self._total - len(self._events)) + 1
        return [event for event in islice(self._events, start, None) if event.channel in channels]
