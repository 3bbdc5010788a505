"""Validation and encoding (ssecast._encoder): typed refusals before anything is queued."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import pytest

from sse_parser import parse
from ssecast import (
    GAP_EVENT_TYPE,
    Broadcaster,
    ConfigurationError,
    InvalidFieldError,
    NotSerializableError,
    PayloadTooLargeError,
    PublishError,
    UnknownEventTypeError,
)


def test_default_json_is_compact_and_keeps_unicode(broadcaster: Broadcaster) -> None:
    """The default serializer writes no spaces and keeps non-ASCII text unescaped."""
    assert broadcaster.publish("t", {"k": ["é", 1]}).data == '{"k":["é",1]}'


def test_a_serializer_may_return_utf8_bytes() -> None:
    """Bytes from the serializer are taken as UTF-8 text."""
    with Broadcaster(serializer=lambda data: str(data).encode()) as b:
        assert b.publish("t", "é").data == "é"


def test_more_types_and_channels_than_the_cache_holds_still_work(
    broadcaster: Broadcaster,
) -> None:
    """Publishing with thousands of distinct names keeps validating and delivering each."""
    names = [f"name-{n}" for n in range(1100)]
    with broadcaster.subscribe(*names[-3:]) as sub:
        for name in names:
            broadcaster.publish(name, 1, channel=name)
        with pytest.raises(InvalidFieldError):
            broadcaster.publish("late\n", 1, channel=names[-1])
        with pytest.raises(InvalidFieldError):
            broadcaster.publish(names[-1], 1, channel="late\n")
        assert [event.type for event in parse(sub.read_nowait()).events] == names[-3:]


def _assert_refused(
    b: Broadcaster, error: type[PublishError], match: str, call: Callable[[], object]
) -> PublishError:
    sub = b.subscribe("default", "c")
    before = b.stats()
    with pytest.raises(error, match=match) as caught:
        call()
    assert sub.read_nowait() == b""
    after = b.stats()
    assert after.published == before.published
    assert after.rejected == before.rejected + 1
    sub.close()
    return caught.value


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (math.nan, "Out of range float"),
        ({"x": math.inf}, "Out of range float"),
        ({1, 2}, "not JSON serializable"),
        ({"k": object()}, "not JSON serializable"),
        ({(1, 2): 1}, "keys must be"),
    ],
)
def test_data_json_cannot_carry_is_refused(
    broadcaster: Broadcaster, data: object, match: str
) -> None:
    """NaN, infinities, sets, objects and tuple keys raise NotSerializableError, naming the fix."""
    error = _assert_refused(
        broadcaster, NotSerializableError, match, lambda: broadcaster.publish("t", data)
    )
    assert isinstance(error, TypeError)
    assert isinstance(error, ValueError)
    assert "serializer=" in str(error)


def test_circular_data_is_refused(broadcaster: Broadcaster) -> None:
    """A list containing itself cannot be serialized and is refused, not looped on."""
    circular: list[object] = []
    circular.append(circular)
    _assert_refused(
        broadcaster,
        NotSerializableError,
        "the serializer refused the data",
        lambda: broadcaster.publish("t", circular),
    )


@pytest.mark.parametrize("data", [b"bytes", 1, None, ["a"]])
def test_raw_refuses_anything_but_str(broadcaster: Broadcaster, data: object) -> None:
    """``raw=True`` takes a str only; the message says to pass a str or drop raw."""
    _assert_refused(
        broadcaster,
        NotSerializableError,
        f"raw=True sends a str as it is, got {type(data).__name__}; pass a str",
        lambda: broadcaster.publish("t", data, raw=True),
    )


@pytest.mark.parametrize(("raw", "data"), [(True, "a\ud800b"), (False, {"k": "\udfff"})])
def test_lone_surrogates_are_refused(broadcaster: Broadcaster, raw: bool, data: object) -> None:
    """Text UTF-8 cannot encode raises NotSerializableError instead of UnicodeEncodeError."""
    error = _assert_refused(
        broadcaster,
        NotSerializableError,
        "remove lone surrogates",
        lambda: broadcaster.publish("t", data, raw=raw),
    )
    assert isinstance(error.__cause__, UnicodeEncodeError)


@pytest.mark.parametrize(
    ("serializer", "match"),
    [
        (lambda data: 42, "must return str or bytes, not int"),
        (lambda data: None, "must return str or bytes, not NoneType"),
        (lambda data: b"\xff\xfe", "returned bytes that are not UTF-8"),
    ],
)
def test_a_serializer_returning_a_bad_value_is_refused(
    serializer: Callable[[Any], Any], match: str
) -> None:
    """Wrong return types and non-UTF-8 bytes raise NotSerializableError."""
    with Broadcaster(serializer=serializer) as b:
        _assert_refused(b, NotSerializableError, match, lambda: b.publish("t", 1))


def test_a_bug_inside_the_serializer_propagates_unchanged() -> None:
    """An error that is not about the data (here a KeyError) is not disguised as bad data."""

    def broken(data: Any) -> str:
        return {"a": "b"}[str(data)]

    with Broadcaster(serializer=broken) as b, pytest.raises(KeyError):
        b.publish("t", 1)


def test_a_serializer_raising_value_error_is_refused_with_the_cause() -> None:
    """The serializer's own error is chained and quoted."""

    def picky(data: Any) -> str:
        raise ValueError("no floats here")

    with Broadcaster(serializer=picky) as b:
        error = _assert_refused(
            b, NotSerializableError, "no floats here", lambda: b.publish("t", 1)
        )
    assert isinstance(error.__cause__, ValueError)


def test_payload_limit_counts_utf8_bytes_not_characters() -> None:
    """Ten bytes fit in ten; six two-byte characters (twelve bytes) do not."""
    with Broadcaster(max_payload_bytes=10) as b:
        assert b.publish("t", "é" * 5, raw=True).data == "é" * 5
        error = _assert_refused(
            b,
            PayloadTooLargeError,
            "12 bytes, over the limit of 10",
            lambda: b.publish("t", "é" * 6, raw=True),
        )
        assert isinstance(error, PayloadTooLargeError)
        assert (error.size, error.limit) == (12, 10)
        assert "max_payload_bytes" in str(error)
        # Serialized JSON counts its quotes: '"éééé"' is ten bytes.
        b.publish("t", "é" * 4)
        with pytest.raises(PayloadTooLargeError):
            b.publish("t", "é" * 5)


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\0", ""])
@pytest.mark.parametrize("field", ["event_type", "channel"])
def test_type_or_channel_with_line_breaks_or_nul_is_refused(
    broadcaster: Broadcaster, field: str, bad: str
) -> None:
    """CR, LF or NUL in a type or channel (SSE field injection) raise InvalidFieldError."""
    value = f"evil{bad}data: injected" if bad else bad
    event_type, channel = (value, "c") if field == "event_type" else ("t", value)
    _assert_refused(
        broadcaster,
        InvalidFieldError,
        "CR, LF and NUL" if bad else "must not be empty",
        lambda: broadcaster.publish(event_type, 1, channel=channel),
    )


@pytest.mark.parametrize("value", [None, 3, b"t"])
def test_non_str_type_or_channel_is_refused(broadcaster: Broadcaster, value: object) -> None:
    """Only str names are accepted, even when they look harmless."""
    _assert_refused(
        broadcaster,
        InvalidFieldError,
        "expected a str",
        lambda: broadcaster.publish(cast(str, value), 1),
    )
    _assert_refused(
        broadcaster,
        InvalidFieldError,
        "expected a str",
        lambda: broadcaster.publish("t", 1, channel=cast(str, value)),
    )


@pytest.mark.parametrize("event_type", [GAP_EVENT_TYPE, "ssecast.anything"])
def test_the_ssecast_type_prefix_is_reserved(broadcaster: Broadcaster, event_type: str) -> None:
    """Publishers cannot forge ssecast's own events, such as the gap event."""
    _assert_refused(
        broadcaster, InvalidFieldError, "reserved", lambda: broadcaster.publish(event_type, {})
    )
    assert broadcaster.publish("ssecastle", 1).type == "ssecastle"


def test_allowlisted_types_publish_and_others_are_refused() -> None:
    """With event_types set, only those types pass."""
    with Broadcaster(event_types=("a", "b")) as b:
        assert b.publish("a", 1).type == "a"
        assert b.publish("b", 1).type == "b"
        error = _assert_refused(
            b, UnknownEventTypeError, "'c' is not allowed", lambda: b.publish("c", 1)
        )
        assert "'a', 'b'" in str(error)
        _assert_refused(b, InvalidFieldError, "CR, LF", lambda: b.publish("a\n", 1))


def test_event_types_given_as_one_str_is_refused() -> None:
    """``event_types="update"`` is a mistake for ``["update"]`` and is refused, not split."""
    with pytest.raises(ConfigurationError, match=r"event_types=\['update'\]"):
        Broadcaster(event_types="update")


@pytest.mark.parametrize(
    ("name", "reason"),
    [("", "must not be empty"), ("a\nb", "CR, LF and NUL"), (GAP_EVENT_TYPE, "reserved")],
)
def test_invalid_names_in_event_types_are_a_configuration_error(name: str, reason: str) -> None:
    """A bad allowlist is a constructor argument error, not a refused publish."""
    with pytest.raises(ConfigurationError, match=f"event_types: .*{reason}"):
        Broadcaster(event_types=["ok", name])
