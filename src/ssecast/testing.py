"""Test Server-Sent Events endpoints: read a response, in-process, as an `EventSource` would.

[`stream`][ssecast.testing.stream] (or [`astream`][ssecast.testing.astream] in an async
test) runs one GET request against an ASGI or WSGI application, with no server and no
socket, and hands out the events as the browser would dispatch them:

    from ssecast.testing import stream

    def test_prices(app, broadcaster):
        with stream(app, "/events") as events:
            broadcaster.publish("price_update", {"price": 200})
            assert events.next_event().event == "price_update"

[`parse`][ssecast.testing.parse] reads a whole body the same way. This module uses the
standard library only, and imports no framework.
"""

from __future__ import annotations

from collections.abc import Iterable

from ssecast._sse_parser import EventStreamParser, ReceivedEvent
from ssecast._test_stream import AsyncTestStream, TestStream, astream, stream

__all__ = ["AsyncTestStream", "ReceivedEvent", "TestStream", "astream", "parse", "stream"]


def parse(
    data: bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview],
) -> list[ReceivedEvent]:
    """Return the events an `EventSource` dispatches from a `text/event-stream` body.

    It follows the WHATWG HTML standard's "interpreting an event stream" exactly: lines
    end at CRLF, CR or LF; comments are skipped; an event without a `data` field is not
    dispatched; one leading BOM is dropped; the text is UTF-8, decoded with replacement
    characters; an event not ended by a blank line at the end of the data is discarded.

    :param data: the body, whole or as chunks split anywhere (even inside a UTF-8
        character or a CRLF).
    :returns: the events, in order.
    """
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    parser = EventStreamParser()
    return [event for chunk in chunks for event in parser.feed(bytes(chunk))]
