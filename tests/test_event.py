"""Event values and field rules (ssecast._event)."""

from __future__ import annotations

import dataclasses

import pytest

from sse_parser import ParsedEvent, parse
from ssecast import Draft, Event, InvalidFieldError
from ssecast._event import check_field


def test_event_is_immutable() -> None:
    """No attribute of a published event can be reassigned or added."""
    event = Event("t", "1", "c", "d", b"frame")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "other"  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        event.extra = 1  # type: ignore[attr-defined]


def test_events_with_equal_fields_are_equal_and_hashable() -> None:
    """Events compare by value, so they can be used in sets and as keys."""
    assert Event("t", "1", "c", "d", b"f") == Event("t", "1", "c", "d", b"f")
    assert len({Event("t", "1", "c", "d", b"f"), Event("t", "1", "c", "d", b"f")}) == 1


def test_stamping_a_draft_gives_the_event_with_the_id_line_first() -> None:
    """A backend's id becomes the event's id and the first line of its frame."""
    draft = Draft("update", "prices", '{"p":1}', b'event: update\ndata: {"p":1}\n\n')
    event = draft.stamp("abc-1")
    assert event == Event(
        "update", "abc-1", "prices", '{"p":1}', b'id: abc-1\nevent: update\ndata: {"p":1}\n\n'
    )
    assert parse(event.frame).events == [ParsedEvent("update", '{"p":1}', "abc-1")]


@pytest.mark.parametrize("value", ["a", "price_update", "with space", "ünï", "a:b", " lead"])
def test_check_field_returns_a_valid_value_unchanged(value: str) -> None:
    """Any non-empty str free of CR, LF and NUL passes as it is."""
    assert check_field("channel", value) is value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "must not be empty"),
        ("a\rb", "CR, LF and NUL"),
        ("a\nb", "CR, LF and NUL"),
        ("a\0b", "CR, LF and NUL"),
        ("a\ud800b", "lone surrogate"),
        ("\udfff", "lone surrogate"),
        (b"bytes", "expected a str, got bytes"),
        (None, "expected a str, got NoneType"),
        (7, "expected a str, got int"),
    ],
)
def test_check_field_refuses_what_could_break_or_inject_a_line(value: object, reason: str) -> None:
    """Empty, non-str, non-Unicode values and CR, LF or NUL raise InvalidFieldError."""
    with pytest.raises(InvalidFieldError, match=reason) as caught:
        check_field("event type", value)
    assert caught.value.field == "event type"
    assert caught.value.value == value
    assert str(caught.value).startswith(f"invalid event type {value!r}")
