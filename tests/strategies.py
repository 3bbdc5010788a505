"""Every Hypothesis strategy the tests use, in one place."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = [
    "bad_field_values",
    "channels",
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
