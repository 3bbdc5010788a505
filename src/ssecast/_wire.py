"""SSE framing: the only module that knows how events look on the wire.

It follows the WHATWG HTML specification's `text/event-stream` format: UTF-8,
`field: value` lines, one `data:` line per line of the data, a blank line to end
an event, and lines starting with `:` as comments.
"""

from __future__ import annotations

import re

__all__ = ["HEARTBEAT", "encode_body", "event_prefix", "retry", "stamp"]

# The spec ends a line at CRLF, a lone CR or a lone LF. str.splitlines() would also
# split at form feeds, U+2028 and friends, which SSE carries as ordinary characters.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")

# A comment line: clients ignore it, proxies see traffic and keep the connection open.
HEARTBEAT = b":\n\n"


def encode_body(prefix: bytes, data: bytes) -> bytes:
    """Return an event's frame without its `id:` line.

    :param prefix: the `event:` line, made once per type by `event_prefix`.
    :param data: the UTF-8 data; each of its lines becomes a `data:` line.
    """
    if b"\r" in data or b"\n" in data:
        data = b"\ndata: ".join(_LINE_BREAK.split(data))
    return b"".join((prefix, b"data: ", data, b"\n\n"))


def event_prefix(event_type: str) -> bytes:
    """Return the `event:` line for a type the caller has already validated."""
    return b"event: " + event_type.encode() + b"\n"


def stamp(event_id: str, body: bytes) -> bytes:
    """Return the complete frame: the `id:` line, then the body from `encode_body`."""
    return b"id: " + event_id.encode() + b"\n" + body


def retry(milliseconds: int) -> bytes:
    """Return the frame that sets the client's reconnection delay."""
    return b"retry: %d\n\n" % milliseconds
