"""SSE framing (ssecast._wire), checked against the spec and the independent parser."""

from __future__ import annotations

import pytest

from sse_parser import ParsedEvent, parse
from ssecast import _wire


def _frame(event_type: str, event_id: str, data: str) -> bytes:
    return _wire.stamp(event_id, _wire.encode_body(_wire.event_prefix(event_type), data.encode()))


def test_frame_has_id_event_and_data_lines_and_ends_with_a_blank_line() -> None:
    """A frame is ``id:``, ``event:``, ``data:`` and a blank line, in that order."""
    assert _frame("update", "7", '{"a":1}') == b'id: 7\nevent: update\ndata: {"a":1}\n\n'


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("a\nb", [b"a", b"b"]),
        ("a\r\nb", [b"a", b"b"]),
        ("a\rb", [b"a", b"b"]),
        ("a\r\rb", [b"a", b"", b"b"]),
        ("a\n\r\nb", [b"a", b"", b"b"]),
        ("\n", [b"", b""]),
        ("", [b""]),
    ],
)
def test_every_kind_of_line_break_starts_a_new_data_line(data: str, lines: list[bytes]) -> None:
    """CRLF, lone CR and lone LF all split the data into one ``data:`` line each."""
    body = _wire.encode_body(b"event: e\n", data.encode())
    assert body == b"event: e\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


@pytest.mark.parametrize("separator", ["\f", "\v", "\x85", "\u2028", "\u2029", "\x1c"])
def test_unicode_line_separators_stay_inside_one_data_line(separator: str) -> None:
    """Characters that str.splitlines() breaks at are ordinary text in SSE."""
    body = _wire.encode_body(b"", f"a{separator}b".encode())
    assert body == f"data: a{separator}b\n\n".encode()


def test_frame_is_utf8() -> None:
    """Type and data are written as UTF-8."""
    frame = _frame("ünïcode", "1", "日本 🎉")
    assert frame.decode("utf-8") == "id: 1\nevent: ünïcode\ndata: 日本 🎉\n\n"


def test_heartbeat_is_a_comment_that_dispatches_nothing() -> None:
    """The keep-alive frame is a comment line and a blank line: no event for the client."""
    assert _wire.HEARTBEAT.startswith(b":")
    assert parse(_wire.HEARTBEAT).events == []


def test_retry_frame_sets_the_reconnection_delay_and_dispatches_nothing() -> None:
    """``retry(n)`` is a ``retry:`` field a client honours, not an event."""
    assert _wire.retry(2500) == b"retry: 2500\n\n"
    parsed = parse(_wire.retry(2500))
    assert parsed.retry == 2500
    assert parsed.events == []


def test_frames_parse_back_to_their_type_id_and_data() -> None:
    """The spec parser reads back exactly what the encoder wrote, line breaks as LF."""
    stream = _frame("a", "1", "x\r\ny") + _frame("b", "2", "") + _frame("c", "3", " lead\n")
    assert parse(stream).events == [
        ParsedEvent("a", "x\ny", "1"),
        ParsedEvent("b", "", "2"),
        ParsedEvent("c", " lead\n", "3"),
    ]


# The reference parser itself, checked against the examples and rules of the spec, so that
# the round-trip properties that rely on it prove something.


def test_parser_joins_data_lines_with_lf_and_drops_the_last_lf() -> None:
    """The spec's stock-ticker example: three data lines make one event."""
    parsed = parse(b"data: YHOO\ndata: +2\ndata: 10\n\n")
    assert parsed.events == [ParsedEvent("message", "YHOO\n+2\n10", "")]


def test_parser_strips_exactly_one_leading_space_and_splits_at_the_first_colon() -> None:
    """``data:test`` and ``data: test`` are equal; a second space and later colons stay."""
    parsed = parse(b"data:test\n\ndata: test\n\ndata:  a:b\n\n")
    assert [event.data for event in parsed.events] == ["test", "test", " a:b"]


def test_parser_ignores_comments_and_unknown_fields() -> None:
    """Comment lines and unknown field names change nothing."""
    parsed = parse(b": hello\nfoo: bar\ndata: x\n:another\n\n")
    assert parsed.events == [ParsedEvent("message", "x", "")]


def test_parser_reads_a_field_without_colon_as_an_empty_value() -> None:
    """A bare ``data`` line adds an empty line; the spec's example dispatches ``""`` and LF."""
    parsed = parse(b"data\n\ndata\ndata\n\ndata:\n")
    assert parsed.events == [ParsedEvent("message", "", ""), ParsedEvent("message", "\n", "")]


def test_parser_does_not_dispatch_an_event_without_data() -> None:
    """A blank line with an empty data buffer dispatches nothing and resets the type."""
    parsed = parse(b"event: a\n\ndata: x\n\n")
    assert parsed.events == [ParsedEvent("message", "x", "")]


def test_parser_accepts_crlf_cr_and_lf_line_endings_and_drops_one_bom() -> None:
    """All three line endings end a line, and a leading BOM is not part of the first field."""
    parsed = parse(b"\xef\xbb\xbfdata: a\r\n\r\ndata: b\r\rdata: c\n\n")
    assert [event.data for event in parsed.events] == ["a", "b", "c"]


def test_parser_keeps_the_last_id_and_ignores_ids_holding_nul() -> None:
    """The last event id persists across events; an id with NUL is ignored."""
    parsed = parse(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\nid\ndata: c\n\n")
    assert [event.last_event_id for event in parsed.events] == ["1", "1", ""]


def test_parser_honours_retry_only_when_it_is_ascii_digits() -> None:
    """``retry`` with anything but ASCII digits is ignored."""
    assert parse(b"retry: 10\n\nretry: 1x\n\n").retry == 10
    assert parse(b"retry: \xd9\xa3\n\n").retry is None


def test_parser_discards_an_event_cut_off_at_the_end_of_the_stream() -> None:
    """Without its blank line an event is never dispatched."""
    assert parse(b"data: a\n\ndata: b\n").events == [ParsedEvent("message", "a", "")]
