"""Every Hypothesis strategy the tests use, in one place."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "bad_field_values",
    "channels",
    "event_stream_chunks",
    "event_types",
    "json_values",
    "raw_texts",
]

# Any Unicode scalar value that UTF-8 can carry (Hypothesis never makes lone surrogates here).
_unicode = st.characters(codec="utf-8")

# Text with line breaks of every kind, blank lines and lone CRs included.
_line_breaks = st.sampled_from(["\r\n", "\r", "\n", "\n\n", "\r\r", "\r\n\r\n"])

json_scalars: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_unicode)
)

json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(_unicode, max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
"""Any JSON value: nested dicts and lists of unicode text, numbers, booleans and null."""

raw_texts: st.SearchStrategy[str] = st.lists(
    st.text(_unicode, max_size=12) | _line_breaks, max_size=8
).map("".join)
"""Text for ``raw=True``: unicode with CR, LF and CRLF anywhere, empty lines, or nothing."""


def _field_text(min_size: int = 1) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(codec="utf-8", exclude_characters="\r\n\0"), min_size=min_size, max_size=20
    )


event_types: st.SearchStrategy[str] = _field_text().filter(
    lambda name: not name.startswith("ssecast.")
)
"""A valid event type: non-empty, no CR, LF or NUL, not in the reserved ``ssecast.`` space."""

channels: st.SearchStrategy[str] = _field_text()
"""A valid channel name: non-empty, no CR, LF or NUL."""

bad_field_values: st.SearchStrategy[str] = st.builds(
    lambda before, bad, after: before + bad + after,
    _field_text(min_size=0),
    st.sampled_from(["\r", "\n", "\0", "\r\n", "\ud800", "\udfff"]),
    _field_text(min_size=0),
)
"""A field value holding CR, LF, NUL (each could inject SSE fields) or a lone surrogate."""


# Pieces of an event stream, chosen to put every kind of line end, BOMs, multi-byte and
# invalid UTF-8 next to each other, so that cuts fall inside them.
_stream_pieces = st.sampled_from(
    [
        b"data: a", b"data:", b"data", b"id: 1", b"id", b"id: \x00", b"event: t", b"event:",
        b"retry: 10", b"retry: x", b": note", b"other: x", b"\xef\xbb\xbf", b"\xc3\xa9",
        b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xe2\x80\xa8", b"\xc2\x85", b"\xff", b"\xc3",
        b" ", b":", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r\r",
    ]
)  # fmt: skip


@st.composite
def event_stream_chunks(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A byte stream, and the same bytes cut into chunks at arbitrary places."""
    whole = b"".join(draw(st.lists(_stream_pieces, max_size=40)))
    cuts = sorted(draw(st.sets(st.integers(0, len(whole)), max_size=len(whole) + 1)))
    bounds = [0, *cuts, len(whole)]
    return whole, [whole[start:end] for start, end in itertools.pairwise(bounds)]
