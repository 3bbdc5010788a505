"""Reading a subscription as a client would, and the promise it relies on as one check."""

from __future__ import annotations

import json
import time

from sse_parser import ParsedEvent, parse
from ssecast import GAP_EVENT_TYPE, Event, Subscription

# Only catches a hang: what these reads wait for arrives within milliseconds.
READ_SECONDS = 20.0


class Client:
    """Reads one subscription from this thread, as an EventSource would, keeping it all."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.stream = b""

    def events(self, count: int, timeout: float = READ_SECONDS) -> list[ParsedEvent]:
        """Read until ``count`` events (heartbeats aside) arrived in all; return them all."""
        deadline = time.monotonic() + timeout
        while len(events := parse(self.stream).events) < count:
            assert time.monotonic() < deadline, f"{len(events)} of {count} events in {timeout} s"
            chunk = next(self.sub, None)
            assert chunk is not None, f"the subscription ended: {self.sub.close_reason}"
            self.stream += chunk
        return events

    def until(self, last: Event) -> list[ParsedEvent]:
        """Read until ``last`` arrived; return every event received."""
        events = self.events(1)
        while events[-1].last_event_id != last.id:
            events = self.events(len(events) + 1)
        return events


def assert_told_of_every_hole(got: list[ParsedEvent], sent: list[Event]) -> None:
    """Assert that ``got`` is ``sent``, in order and once each, but where a gap stands.

    ``sent`` is what was published on the client's channels, in stream order. An event of
    ``sent`` may be missing from ``got`` only after a gap event and before the next event
    received; a gap that hides nothing is allowed (it is conservative, not a loss).
    """
    ids = [event.id for event in sent]
    expected_next = 0
    told = False
    for event in got:
        if event.type == GAP_EVENT_TYPE:
            told = True
            continue
        assert event.last_event_id in ids, f"{event} was never sent"
        index = ids.index(event.last_event_id)
        assert index >= expected_next, f"{event} came again, or out of order"
        assert index == expected_next or told, f"missed {ids[expected_next:index]} silently"
        assert (event.type, event.data) == (sent[index].type, sent[index].data)
        expected_next, told = index + 1, False


def printed_event(line: bytes) -> Event:
    """The event a publisher process printed as JSON: its type, id, channel and data."""
    type_, id_, channel, data = json.loads(line)
    return Event(type_, id_, channel, data, frame=b"")
