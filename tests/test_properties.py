"""Properties that must hold for any input: Hypothesis over data, names and whole sessions."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import strategies
from sse_parser import ParsedEvent, parse
from ssecast import Broadcaster, CloseReason, InvalidFieldError, Subscription

SETTINGS = settings(max_examples=100, deadline=None)


def _mutate_deeply(value: Any) -> None:
    """Change every container inside ``value`` in place: values, keys and lengths."""
    if isinstance(value, dict):
        for key in list(value):
            _mutate_deeply(value[key])
            value[key] = ["mutated", value[key]]
        value["injected"] = "evil"
    elif isinstance(value, list):
        for item in value:
            _mutate_deeply(item)
        value.reverse()
        value.append("injected")


@SETTINGS
@given(value=strategies.json_values)
def test_any_json_value_reaches_every_subscriber_as_it_was_at_publish_time(value: Any) -> None:
    """Mutating published data, however deeply, changes nothing any subscriber receives."""
    snapshot = copy.deepcopy(value)
    with Broadcaster() as b:
        subs = [b.subscribe() for _ in range(3)]
        event = b.publish("update", value)
        _mutate_deeply(value)
        chunks = [sub.read_nowait() for sub in subs]
    assert chunks == [event.frame] * 3
    assert event.data == json.dumps(snapshot, ensure_ascii=False, separators=(",", ":"))
    (received,) = parse(chunks[0]).events
    assert json.loads(received.data) == snapshot


@SETTINGS
@given(event_type=strategies.event_types, text=strategies.raw_texts)
def test_any_raw_text_round_trips_through_a_spec_parser(event_type: str, text: str) -> None:
    """Type, id and text come back exactly, except that each CR and CRLF arrives as LF."""
    with Broadcaster() as b, b.subscribe() as sub:
        event = b.publish(event_type, text, raw=True)
        events = parse(sub.read_nowait()).events
    assert event.data == text
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert events == [ParsedEvent(event_type, expected, event.id)]


@SETTINGS
@given(event_type=strategies.event_types, value=strategies.json_values)
def test_any_json_value_round_trips_through_a_spec_parser(event_type: str, value: Any) -> None:
    """Type, id and the serialized JSON come back exactly, and decode to the value."""
    with Broadcaster() as b, b.subscribe() as sub:
        event = b.publish(event_type, value)
        events = parse(sub.read_nowait()).events
    assert events == [ParsedEvent(event_type, event.data, event.id)]
    assert json.loads(events[0].data) == value


@SETTINGS
@given(bad=strategies.bad_field_values, field_name=st.sampled_from(["event type", "channel"]))
def test_any_type_or_channel_with_cr_lf_nul_or_surrogates_is_refused(
    bad: str, field_name: str
) -> None:
    """Injecting or non-Unicode names raise InvalidFieldError; nothing is queued or counted."""
    with Broadcaster() as b:
        sub = b.subscribe()
        arguments = {"event_type": bad} if field_name == "event type" else {"channel": bad}
        with pytest.raises(InvalidFieldError) as caught:
            b.publish(
                arguments.get("event_type", "t"), {}, channel=arguments.get("channel", "default")
            )
        assert caught.value.field == field_name
        with pytest.raises(InvalidFieldError):
            b.subscribe(bad)
        assert sub.read_nowait() == b""
        stats = b.stats()
    assert (stats.published, stats.delivered, stats.rejected, stats.subscribers) == (0, 0, 1, 1)


@SETTINGS
@given(full=st.lists(st.booleans(), min_size=1, max_size=40), same_capacity=st.booleans())
def test_evicting_any_subscribers_in_any_positions_never_skips_a_live_one(
    full: list[bool], same_capacity: bool
) -> None:
    """Exactly the full subscribers are evicted; every other one gets every frame."""
    with Broadcaster() as b:
        if same_capacity:
            # One capacity for all: the healthy ones read their first frame, the full ones don't.
            subs = [b.subscribe(queue_size=1) for _ in full]
            first = b.publish("t", 1)
            for is_full, sub in zip(full, subs, strict=True):
                if not is_full:
                    assert sub.read_nowait() == first.frame
            expected = b""
        else:
            subs = [b.subscribe(queue_size=1 if is_full else 2) for is_full in full]
            first = b.publish("t", 1)
            expected = first.frame
        second = b.publish("t", 2)
        for is_full, sub in zip(full, subs, strict=True):
            if is_full:
                assert sub.close_reason is CloseReason.EVICTED
            else:
                assert sub.close_reason is None
                assert sub.read_nowait() == expected + second.frame
        stats = b.stats()
    assert stats.evicted == sum(full)
    assert stats.subscribers == len(full) - sum(full)


# -- a whole session, step by step ---------------------------------------------------------

CHANNELS = ("a", "b", "c")
DEFAULT_QUEUE_SIZE = 3


@dataclass
class Tracked:
    """What the model knows of one subscription."""

    sub: Subscription
    capacity: int
    pending: list[bytes] = field(default_factory=list)
    expected: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)


class FanOutMachine(RuleBasedStateMachine):
    """Subscribe, unsubscribe, publish, consume and overflow in any order, against a model.

    Invariants: the subscriber, delivery and eviction counts are right; every live subscriber has
    read exactly the events published on its channels while it was subscribed, in publish
    order, so any two subscribers saw their common events in the same order.
    """

    def __init__(self) -> None:
        super().__init__()
        # Reads never wait when the model is right; the heartbeat turns a wrong model (or
        # a lost frame) into a failed comparison instead of a hang.
        self.b = Broadcaster(heartbeat=1.0, history=0, queue_size=DEFAULT_QUEUE_SIZE)
        self.live: list[Tracked] = []
        self.gone: list[Tracked] = []
        self.sequence_of: dict[str, int] = {}
        self.published = 0
        self.delivered = 0
        self.evicted = 0

    def _publish(self, channel: str) -> None:
        sequence = self.published
        event = self.b.publish("tick", sequence, channel=channel)
        self.sequence_of[event.id] = sequence
        self.published += 1
        for tracked in list(self.live):
            if channel not in tracked.sub.channels:
                continue
            if len(tracked.pending) == tracked.capacity:
                assert tracked.sub.close_reason is CloseReason.EVICTED
                assert tracked.sub.read_nowait() == b""
                self.live.remove(tracked)
                self.gone.append(tracked)
                self.evicted += 1
            else:
                assert tracked.sub.close_reason is None
                tracked.pending.append(event.frame)
                tracked.expected.append(sequence)
                self.delivered += 1

    def _consume(self, tracked: Tracked, *, blocking: bool) -> None:
        # next() would block on an empty buffer; with frames pending it returns at once.
        chunk = next(tracked.sub) if blocking and tracked.pending else tracked.sub.read_nowait()
        assert chunk == b"".join(tracked.pending)
        for event in parse(chunk).events:
            sequence = self.sequence_of[event.last_event_id]
            assert json.loads(event.data) == sequence
            tracked.received.append(sequence)
        tracked.pending.clear()

    @initialize(channels=st.sets(st.sampled_from(CHANNELS), min_size=1, max_size=2))
    def first_subscriber(self, channels: set[str]) -> None:
        self.subscribe(channels, None)

    @precondition(lambda self: len(self.live) < 8)
    @rule(
        channels=st.sets(st.sampled_from(CHANNELS), min_size=1, max_size=2),
        queue_size=st.none() | st.integers(1, 4),
    )
    def subscribe(self, channels: set[str], queue_size: int | None) -> None:
        sub = self.b.subscribe(*sorted(channels), queue_size=queue_size)
        assert sub.channels == frozenset(channels)
        self.live.append(Tracked(sub, queue_size or DEFAULT_QUEUE_SIZE))

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 63))
    def unsubscribe(self, index: int) -> None:
        tracked = self.live.pop(index % len(self.live))
        tracked.sub.close()
        assert tracked.sub.close_reason is CloseReason.UNSUBSCRIBED
        assert tracked.sub.read_nowait() == b""
        self.gone.append(tracked)

    @rule(channel=st.sampled_from(CHANNELS))
    def publish(self, channel: str) -> None:
        self._publish(channel)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 63), blocking=st.booleans())
    def consume(self, index: int, blocking: bool) -> None:
        self._consume(self.live[index % len(self.live)], blocking=blocking)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 63))
    def overflow(self, index: int) -> None:
        tracked = self.live[index % len(self.live)]
        channel = sorted(tracked.sub.channels)[0]
        for _ in range(tracked.capacity - len(tracked.pending) + 1):
            self._publish(channel)
        assert tracked.sub.close_reason is CloseReason.EVICTED
        assert tracked in self.gone

    @invariant()
    def counts_are_right(self) -> None:
        stats = self.b.stats()
        assert stats.subscribers == len(self.live)
        assert stats.evicted == self.evicted
        assert stats.published == self.published
        assert stats.delivered == self.delivered

    @invariant()
    def everyone_saw_the_same_events_in_the_same_order(self) -> None:
        for tracked in self.live:
            assert tracked.received == tracked.expected[: len(tracked.received)]
        everyone = self.live + self.gone
        for one in everyone:
            for other in everyone:
                common = set(one.received) & set(other.received)
                assert [s for s in one.received if s in common] == [
                    s for s in other.received if s in common
                ]

    def teardown(self) -> None:
        for tracked in self.live:
            self._consume(tracked, blocking=False)
            assert tracked.received == tracked.expected
        self.b.close()


FanOutMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestFanOutSession = FanOutMachine.TestCase
