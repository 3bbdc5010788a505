"""An SSE parser written from the WHATWG HTML spec, independent of ssecast's encoder.

It follows "9.2.6 Interpreting an event stream" step by step, so that what the tests
read back is what a browser's ``EventSource`` would dispatch:

- the stream is UTF-8, decoded with replacement characters, and one leading BOM is dropped;
- a line ends at CRLF, a lone CR or a lone LF (nothing else: not FF, NEL or U+2028);
- an empty line dispatches the pending event; a line starting with ``:`` is a comment;
- ``name: value`` splits at the first colon and drops one leading space of the value;
  a line without a colon is a field whose value is empty;
- ``data`` appends the value and a LF to the data buffer; on dispatch one trailing LF is
  removed, and an event whose data buffer is empty is not dispatched at all;
- ``id`` sets the last event id unless the value holds NUL; ``retry`` is honoured only when
  it is ASCII digits; ``event`` sets the type (``message`` when none); other fields are ignored;
- an event cut off before its blank line at the end of the stream is discarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ParsedEvent", "ParsedStream", "parse"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_ASCII_DIGITS = re.compile(r"[0-9]+")


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
    text = stream.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    parts = _LINE_END.split(text)
    # The last part has no line ending: an unterminated line, discarded at end of stream.
    lines = parts[:-1]

    result = ParsedStream()
    data = ""
    event_type = ""
    last_id_buffer = ""
    for line in lines:
        if line == "":
            result.last_event_id = last_id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            result.events.append(ParsedEvent(event_type or "message", data, last_id_buffer))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                last_id_buffer = value
        elif name == "retry" and _ASCII_DIGITS.fullmatch(value):
            result.retry = int(value)
    return result
