"""The tests' view of an SSE body: ``ssecast.testing``'s WHATWG parser, in the shape they read.

The parser itself is ``ssecast._sse_parser`` (public as ``ssecast.testing.parse``), written
from the HTML standard's "interpreting an event stream" and independent of the encoder in
``ssecast._wire``; ``tests/test_testing.py`` holds it to the standard case by case. This
module only keeps the tests' older names: an event's ``type`` and ``last_event_id``, and
what the stream left in force at its end (``retry`` and the last event id).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssecast._sse_parser import EventStreamParser

__all__ = ["ParsedEvent", "ParsedStream", "parse"]


@dataclass(frozen=True)
class ParsedEvent:
    """One dispatched event, as ``EventSource`` would hand it to a listener."""

    type: str
    data: str
    last_event_id: str


@dataclass
class ParsedStream:
    """Everything a client learns from a stream: the events, the retry delay, the last id."""

    events: list[ParsedEvent] = field(default_factory=list)
    retry: int | None = None
    last_event_id: str = ""


def parse(stream: bytes) -> ParsedStream:
    """Interpret a complete ``text/event-stream`` body the way the spec tells a browser to."""
    parser = EventStreamParser()
    events = [ParsedEvent(e.event, e.data, e.id) for e in parser.feed(stream)]
    return ParsedStream(events, parser.retry, parser.last_event_id)
