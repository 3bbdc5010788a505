"""Read a `text/event-stream` the way a browser's `EventSource` does, chunk by chunk.

It follows the WHATWG HTML standard, "9.2.6 Interpreting an event stream", step by step,
and shares nothing with the encoder in `_wire`, so a test that reads back what ssecast
wrote checks the encoder against the standard rather than against itself:

- the stream is UTF-8, decoded with replacement characters; one leading BOM is dropped;
- a line ends at CRLF, a lone CR or a lone LF, and at nothing else (not NEL, not U+2028);
  a CR ending one chunk and a LF starting the next are one line end;
- an empty line dispatches the pending event; a line starting with `:` is a comment;
- `name: value` splits at the first colon and drops one leading space of the value;
  a line without a colon is a field whose value is empty;
- `data` appends the value and a LF to the data buffer; an event whose data buffer is
  empty is not dispatched, but its `id` still becomes the last event id;
- `id` sets the last event id unless the value holds NUL; `retry` is honoured only when
  it is ASCII digits; `event` sets the type (`message` when empty); others are ignored;
- an event cut off before its blank line at the end of the stream is discarded.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["EventStreamParser", "ReceivedEvent"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One event as an `EventSource` dispatches it to a listener.

    :param id: the last event id in force when it was dispatched (`""` when there is
        none): the id of this event, or of the latest event before it that had one.
    :param event: its type: the `event` field, or `"message"` when there was none.
    :param data: its data: the `data` lines joined with LF.
    :param retry: the reconnection time in force, in milliseconds, from the latest valid
        `retry` field so far; `None` when the stream has sent none.
    """

    id: str
    event: str
    data: str
    retry: int | None = None


class EventStreamParser:
    """An incremental event-stream reader: feed it chunks, get the events they complete.

    Chunks may split the stream anywhere, inside a line, a CRLF or a UTF-8 character.
    """

    __slots__ = (
        "_after_cr",
        "_data",
        "_decoder",
        "_event_type",
        "_id_buffer",
        "_line",
        "_started",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # whether the first character (a BOM, maybe) has been seen
        self._after_cr = False  # the text so far ends with a CR: a LF next ends no line
        self._line: list[str] = []  # the start of a line whose end has not come yet
        self._data: list[str] = []
        self._event_type = ""
        self._id_buffer = ""
        self.last_event_id = ""
        """The last event id set by a dispatch, even of an event that had no data."""
        self.retry: int | None = None
        """The reconnection time the stream set, in milliseconds; `None` when none."""

    def feed(self, chunk: bytes) -> list[ReceivedEvent]:
        """Read the next chunk of the stream; return the events it completes."""
        text = self._decoder.decode(chunk)
        if not text:
            return []  # the chunk ended inside a UTF-8 character
        if not self._started:
            self._started = True
            text = text.removeprefix(_BOM)
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        self._after_cr = text.endswith("\r")
        # Only the new text is searched for line ends, so that a long line coming in many
        # chunks is read in linear time: its start waits in pieces, joined once it ends.
        *lines, rest = _LINE_END.split(text)
        if lines:
            lines[0] = "".join([*self._line, lines[0]])
            self._line = []
        if rest:
            self._line.append(rest)
        events: list[ReceivedEvent] = []
        for line in lines:
            event = self._line_read(line)
            if event is not None:
                events.append(event)
        return events

    def _line_read(self, line: str) -> ReceivedEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ReceivedEvent | None:
        self.last_event_id = self._id_buffer
        data, event_type = self._data, self._event_type
        self._data, self._event_type = [], ""
        if not data:
            return None
        return ReceivedEvent(
            self.last_event_id, event_type or "message", "\n".join(data), self.retry
        )
