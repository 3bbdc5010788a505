"""The ring of recent events used for Last-Event-ID resume (ssecast._history)."""

from __future__ import annotations

from ssecast import Event
from ssecast._history import History

ALL = frozenset({"a", "b"})


def _event(number: int, channel: str = "a") -> Event:
    return Event("t", str(number), channel, str(number), b"frame %d" % number)


def _filled(size: int, count: int, channel: str = "a") -> tuple[History, list[Event]]:
    history = History(size)
    events = [_event(number, channel) for number in range(1, count + 1)]
    for event in events:
        history.append(event)
    return history, events


def test_after_returns_the_later_events_oldest_first() -> None:
    """Resuming after an id gives every newer event, in order."""
    history, events = _filled(10, 5)
    assert history.after("2", ALL) == events[2:]


def test_after_the_newest_event_is_empty_not_unknown() -> None:
    """A client that saw everything gets an empty replay, not a gap."""
    history, _ = _filled(10, 5)
    assert history.after("5", ALL) == []


def test_after_keeps_only_the_requested_channels() -> None:
    """Events on other channels are not replayed."""
    history = History(10)
    events = [_event(1, "a"), _event(2, "b"), _event(3, "a"), _event(4, "b")]
    for event in events:
        history.append(event)
    assert history.after("1", frozenset({"b"})) == [events[1], events[3]]


def test_unknown_id_is_none() -> None:
    """An id never appended cannot be resumed from."""
    history, _ = _filled(10, 3)
    assert history.after("nope", ALL) is None


def test_full_ring_forgets_the_oldest_and_keeps_positions_right() -> None:
    """Past its size the ring drops old ids, and later ids still resume exactly."""
    history, events = _filled(3, 10)
    assert history.after("6", ALL) is None
    assert history.after("8", ALL) == events[8:]
    assert history.after("9", ALL) == events[9:]
    assert history.after("10", ALL) == []


def test_size_zero_keeps_nothing_but_the_newest_id() -> None:
    """With no history an older id is unknown; the newest one means nothing was missed."""
    history, _ = _filled(0, 3)
    assert history.after("2", ALL) is None
    assert history.after("3", ALL) == []
    assert history.last_id == "3"


def test_last_id_is_none_before_any_event() -> None:
    """A fresh ring has no newest id."""
    assert History(5).last_id is None


def test_after_the_id_just_before_the_ring_returns_the_whole_ring() -> None:
    """Every event after id 7 is still kept, so resuming after 7 loses nothing."""
    history, events = _filled(3, 10)
    assert history.after("7", ALL) == events[7:]


def test_after_forget_no_id_resumes_from_the_ring_and_no_bookmark_spans_the_hole() -> None:
    """Once events were lost, every id before the hole is unknown, the newest one included."""
    history, _ = _filled(10, 5)
    bookmark = history.mark
    history.forget()
    assert history.after("3", ALL) is None
    assert history.after("5", ALL) is None  # the newest: it missed what was lost after it
    assert history.last_id == "5"  # still what this process delivered last
    assert history.since(bookmark, ALL) is None
    # A bookmark taken as the hole was found spans it too: the replay up to it would
    # come from before the hole, the ring's events from after.
    assert history.since(history.mark, ALL) is None
    history.append(_event(6))
    after_the_hole = history.mark
    history.append(later := _event(7))
    assert history.after("6", ALL) == [later]
    assert history.since(after_the_hole, ALL) == [later]
    assert history.size == 10
