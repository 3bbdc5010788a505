"""The Broadcaster (ssecast._broadcaster): validate, encode once, fan out, evict, resume."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import pytest

from sse_parser import ParsedEvent, parse
from ssecast import (
    DEFAULT_CHANNEL,
    GAP_EVENT_TYPE,
    Broadcaster,
    BroadcasterClosedError,
    CloseReason,
    ConfigurationError,
    Event,
    InvalidFieldError,
    NotSerializableError,
    PayloadTooLargeError,
    PublishError,
    Stats,
    Subscription,
    TooManySubscribersError,
    UnknownEventTypeError,
)

JOIN_TIMEOUT = 10.0


def _events(chunk: bytes) -> list[ParsedEvent]:
    return parse(chunk).events


def _ids(chunk: bytes) -> list[str]:
    return [event.last_event_id for event in _events(chunk)]


def _run_threads(targets: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a thread deadlocked"


class CountingSerializer:
    """Compact JSON, counting how often it is called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: Any) -> str:
        self.calls += 1
        return json.dumps(data, separators=(",", ":"))


# -- the seed report's seven tests, on the public API ------------------------------------


def test_queued_item_is_pre_serialized_bytes(broadcaster: Broadcaster) -> None:
    """What a subscriber gets is ready-to-send SSE bytes, already serialized."""
    data = {"ticker": "TSLA", "price": 200.0}
    with broadcaster.subscribe() as sub:
        event = broadcaster.publish("price_update", data)
        chunk = sub.read_nowait()
    assert isinstance(chunk, bytes)
    assert chunk == event.frame
    assert _events(chunk) == [ParsedEvent("price_update", event.data, event.id)]
    assert json.loads(event.data) == data


def test_mutating_data_after_publish_does_not_change_what_is_sent(
    broadcaster: Broadcaster,
) -> None:
    """The caller may reuse or mutate its dict right after publish returns."""
    data: dict[str, Any] = {"ticker": "TSLA", "price": 200.0}
    with broadcaster.subscribe() as sub:
        broadcaster.publish("price_update", data)
        data["price"] = 999.0
        data["injected_key"] = "evil"
        received = json.loads(_events(sub.read_nowait())[0].data)
    assert received == {"ticker": "TSLA", "price": 200.0}


def test_several_subscribers_get_the_very_same_bytes(broadcaster: Broadcaster) -> None:
    """Every subscriber receives the one frame encoded at publish time, unaffected by mutation."""
    subs = [broadcaster.subscribe() for _ in range(5)]
    data: dict[str, Any] = {"ticker": "MSFT", "price": 300.0, "volume": 1_000_000}
    event = broadcaster.publish("price_update", data)
    data["price"] = 999.0
    data["volume"] = 0
    chunks = [sub.read_nowait() for sub in subs]
    assert chunks == [event.frame] * 5
    assert json.loads(_events(chunks[0])[0].data) == {
        "ticker": "MSFT",
        "price": 300.0,
        "volume": 1_000_000,
    }


def test_ten_concurrent_publishers_lose_nothing() -> None:
    """Events published at once from ten threads all arrive, once each, as valid JSON."""
    publishers, per_publisher = 10, 50
    with Broadcaster(queue_size=publishers * per_publisher) as b:
        sub = b.subscribe()
        barrier = threading.Barrier(publishers)

        def publisher(number: int) -> None:
            barrier.wait(JOIN_TIMEOUT)
            for sequence in range(per_publisher):
                b.publish("price_update", {"ticker": f"TICK{number:02d}", "n": sequence})

        _run_threads([functools.partial(publisher, n) for n in range(publishers)])
        events = _events(sub.read_nowait())
        stats = b.stats()
    received = [json.loads(event.data) for event in events]
    expected = [{"ticker": f"TICK{n:02d}", "n": s} for n in range(publishers) for s in range(50)]
    assert sorted(received, key=lambda d: (d["ticker"], d["n"])) == expected
    assert len({event.last_event_id for event in events}) == publishers * per_publisher
    for number in range(publishers):
        mine = [d["n"] for d in received if d["ticker"] == f"TICK{number:02d}"]
        assert mine == sorted(mine), "one thread's events arrived out of order"
    assert (stats.published, stats.delivered) == (500, 500)


def test_a_full_subscriber_is_evicted_while_others_get_everything(
    broadcaster: Broadcaster,
) -> None:
    """The subscriber over its queue_size is closed as evicted; the healthy one misses nothing."""
    full = broadcaster.subscribe(queue_size=1)
    live = broadcaster.subscribe()
    first = broadcaster.publish("price_update", {"placeholder": True})
    second = broadcaster.publish("price_update", {"ticker": "AAPL", "price": 150.0})
    assert full.close_reason is CloseReason.EVICTED
    assert full.read_nowait() == b""
    assert live.close_reason is None
    assert live.read_nowait() == first.frame + second.frame
    assert broadcaster.stats() == Stats(
        subscribers=1,
        published=2,
        delivered=3,
        evicted=1,
        rejected=0,
        revoked=0,
        expired=0,
        refused=0,
    )


def test_an_unknown_event_type_is_rejected_with_nothing_queued() -> None:
    """A type outside the allowlist raises UnknownEventTypeError before anyone sees anything."""
    with Broadcaster(event_types=["price_update"]) as b:
        sub = b.subscribe()
        with pytest.raises(UnknownEventTypeError) as caught:
            b.publish("__unknown_event__", {"foo": "bar"})
        assert caught.value.event_type == "__unknown_event__"
        assert sub.read_nowait() == b""
        assert b.stats() == Stats(
            subscribers=1,
            published=0,
            delivered=0,
            evicted=0,
            rejected=1,
            revoked=0,
            expired=0,
            refused=0,
        )


def test_twenty_threads_subscribing_and_unsubscribing_leave_no_subscriber() -> None:
    """Subscribing and leaving from 20 threads while events flow leaves the count at zero."""
    clients, rounds, events = 20, 20, 200
    with Broadcaster() as b:
        barrier = threading.Barrier(clients + 1)
        reasons: list[CloseReason | None] = []

        def client() -> None:
            barrier.wait(JOIN_TIMEOUT)
            for _ in range(rounds):
                with b.subscribe() as sub:
                    sub.read_nowait()
                reasons.append(sub.close_reason)

        def sender() -> None:
            barrier.wait(JOIN_TIMEOUT)
            for number in range(events):
                b.publish("price_update", {"ticker": "AAPL", "price": float(number)})

        _run_threads([*(client for _ in range(clients)), sender])
        stats = b.stats()
    assert stats.subscribers == 0
    assert stats.published == events
    assert reasons == [CloseReason.UNSUBSCRIBED] * (clients * rounds)


# -- eviction never skips a live subscriber -----------------------------------------------


def test_evicting_any_subscribers_in_any_positions_never_skips_a_live_one() -> None:
    """For every choice of full subscribers among six, exactly those go and the rest get all."""
    count = 6
    for full_positions in itertools.product((False, True), repeat=count):
        with Broadcaster() as b:
            subs = [b.subscribe(queue_size=1 if full else 10) for full in full_positions]
            first = b.publish("t", 1)
            second = b.publish("t", 2)
            for full, sub in zip(full_positions, subs, strict=True):
                if full:
                    assert sub.close_reason is CloseReason.EVICTED, full_positions
                else:
                    assert sub.close_reason is None, full_positions
                    assert sub.read_nowait() == first.frame + second.frame, full_positions
            assert b.stats().subscribers == count - sum(full_positions)
            assert b.stats().evicted == sum(full_positions)


def test_one_serialization_for_a_thousand_subscribers() -> None:
    """The serializer runs once per event, however many subscribers receive it."""
    serializer = CountingSerializer()
    with Broadcaster(serializer=serializer) as b:
        subs = [b.subscribe() for _ in range(1000)]
        event = b.publish("t", {"n": 1})
        assert serializer.calls == 1
        assert all(sub.read_nowait() == event.frame for sub in subs)
        assert b.stats().delivered == 1000
    assert serializer.calls == 1


# -- publishing ---------------------------------------------------------------------------


def test_publish_returns_the_event_it_sent(broadcaster: Broadcaster) -> None:
    """The returned Event carries the type, channel, serialized data, id and exact frame."""
    event = broadcaster.publish("price_update", {"ticker": "TSLA", "price": 200.0}, channel="p")
    assert (event.type, event.channel, event.data) == (
        "price_update",
        "p",
        '{"ticker":"TSLA","price":200.0}',
    )
    assert _events(event.frame) == [ParsedEvent("price_update", event.data, event.id)]


def test_raw_text_is_sent_as_given_with_each_line_break_as_lf(broadcaster: Broadcaster) -> None:
    """``raw=True`` keeps the str in Event.data; the client reads CR and CRLF as LF."""
    html = "<li>\r\nTSLA\r200</li>\n"
    with broadcaster.subscribe() as sub:
        event = broadcaster.publish("update", html, raw=True)
        received = _events(sub.read_nowait())
    assert event.data == html
    assert received == [ParsedEvent("update", "<li>\nTSLA\n200</li>\n", event.id)]


def test_an_empty_raw_string_arrives_as_one_event_with_empty_data(
    broadcaster: Broadcaster,
) -> None:
    """Empty data still dispatches an event on the client."""
    with broadcaster.subscribe() as sub:
        event = broadcaster.publish("ping", "", raw=True)
        assert _events(sub.read_nowait()) == [ParsedEvent("ping", "", event.id)]


def test_channels_keep_events_apart_and_default_is_default(broadcaster: Broadcaster) -> None:
    """A subscriber gets only its channels; no channel on either side means "default"."""
    default = broadcaster.subscribe()
    prices = broadcaster.subscribe("prices")
    both = broadcaster.subscribe("prices", DEFAULT_CHANNEL)
    a = broadcaster.publish("t", 1)
    b = broadcaster.publish("t", 2, channel="prices")
    c = broadcaster.publish("t", 3, channel="nobody-listens")
    assert (a.channel, c.channel) == (DEFAULT_CHANNEL, "nobody-listens")
    assert default.channels == frozenset({DEFAULT_CHANNEL})
    assert default.read_nowait() == a.frame
    assert prices.read_nowait() == b.frame
    assert both.read_nowait() == a.frame + b.frame


def test_ids_are_unique_and_increase_in_publish_order(broadcaster: Broadcaster) -> None:
    """Every event gets its own id, and a subscriber receives them in publish order."""
    with broadcaster.subscribe() as sub:
        published = [broadcaster.publish("t", n).id for n in range(100)]
        assert _ids(sub.read_nowait()) == published
    assert len(set(published)) == 100


def test_two_broadcasters_never_share_an_id() -> None:
    """Ids from one broadcaster cannot be mistaken for another's."""
    with Broadcaster() as one, Broadcaster() as two:
        assert one.publish("t", 1).id != two.publish("t", 1).id


def test_apublish_sends_like_publish() -> None:
    """The awaitable twin delivers the same way, from inside the event loop."""

    async def main() -> tuple[Event, bytes]:
        async with Broadcaster() as b:
            sub = b.subscribe()
            event = await b.apublish("t", {"a": 1}, channel=DEFAULT_CHANNEL)
            return event, sub.read_nowait()

    event, chunk = asyncio.run(main())
    assert chunk == event.frame


def test_subscribe_refuses_invalid_channels_and_last_event_ids(broadcaster: Broadcaster) -> None:
    """Bad channel names and non-str resume ids raise InvalidFieldError; nothing subscribes."""
    with pytest.raises(InvalidFieldError):
        broadcaster.subscribe("ok", "bad\n")
    with pytest.raises(InvalidFieldError, match="last event id"):
        broadcaster.subscribe(last_event_id=5)  # type: ignore[arg-type]
    assert broadcaster.stats().subscribers == 0


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_payload_bytes": 0}, "max_payload_bytes must be an int of at least 1, got 0"),
        ({"max_payload_bytes": 1.5}, "max_payload_bytes must be an int"),
        ({"queue_size": 0}, "queue_size must be an int of at least 1"),
        ({"queue_size": True}, "queue_size must be an int"),
        ({"queue_size": "8"}, "queue_size must be an int"),
        ({"history": -1}, "history must be an int of at least 0"),
        ({"heartbeat": 0}, "heartbeat must be a positive number"),
        ({"heartbeat": -1.0}, "heartbeat must be a positive number"),
        ({"heartbeat": math.nan}, "heartbeat must be a positive number"),
        ({"retry": -1}, "retry must be an int of at least 0"),
        ({"retry": 1.5}, "retry must be an int"),
        ({"max_subscribers": 0}, "max_subscribers must be an int of at least 1"),
    ],
)
def test_out_of_range_arguments_raise_configuration_error(
    kwargs: dict[str, Any], match: str
) -> None:
    """Each bad constructor argument raises ConfigurationError (a ValueError) naming it."""
    with pytest.raises(ConfigurationError, match=match) as caught:
        Broadcaster(**kwargs)
    assert isinstance(caught.value, ValueError)


def test_subscribe_queue_size_must_be_positive(broadcaster: Broadcaster) -> None:
    """A per-subscriber queue_size below one is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="queue_size"):
        broadcaster.subscribe(queue_size=0)


@pytest.mark.parametrize("heartbeat", ["5", math.inf, 1e12, True])
def test_a_heartbeat_no_thread_can_wait_for_is_a_configuration_error(heartbeat: object) -> None:
    """A heartbeat that is not a number, or longer than a thread can wait, is refused up front."""
    with pytest.raises(ConfigurationError, match="heartbeat must be a positive number"):
        Broadcaster(heartbeat=heartbeat)  # type: ignore[arg-type]


def test_the_longest_heartbeat_a_thread_can_wait_for_is_accepted() -> None:
    """Up to threading.TIMEOUT_MAX seconds, and ints as well as floats, are valid heartbeats."""
    Broadcaster(heartbeat=threading.TIMEOUT_MAX).close()
    Broadcaster(heartbeat=1).close()


# -- lifecycle ----------------------------------------------------------------------------


def test_a_close_that_overtakes_a_publish_makes_it_raise() -> None:
    """Closed while a publish was under way, the publish raises: it never returns unsent."""
    b: Broadcaster

    def closing_serializer(data: object) -> str:
        b.close()  # another thread's close(), landing while this publish serializes
        return json.dumps(data)

    b = Broadcaster(serializer=closing_serializer)
    sub = b.subscribe()
    with pytest.raises(BroadcasterClosedError, match="not sent"):
        b.publish("t", 1)
    assert sub.read_nowait() == b""
    assert b.stats().published == 0


def test_after_close_publish_and_subscribe_raise_broadcaster_closed() -> None:
    """A closed broadcaster refuses new work with BroadcasterClosedError (a RuntimeError)."""
    b = Broadcaster()
    b.close()
    b.close()
    with pytest.raises(BroadcasterClosedError, match="closed"):
        b.publish("t", 1)
    with pytest.raises(BroadcasterClosedError, match="closed"):
        b.subscribe()
    with pytest.raises(RuntimeError):
        asyncio.run(b.apublish("t", 1))
    assert b.stats().rejected == 0
    assert "closed" in repr(b)


async def test_async_with_closes_the_broadcaster_and_its_subscriptions() -> None:
    """Leaving ``async with`` shuts everything down without blocking the loop."""
    async with Broadcaster() as b:
        sub = b.subscribe()
    assert sub.close_reason is CloseReason.SHUTDOWN
    with pytest.raises(BroadcasterClosedError):
        await b.apublish("t", 1)
    await b.aclose()


def test_with_block_closes_the_broadcaster() -> None:
    """Leaving ``with`` shuts down every subscription."""
    with Broadcaster() as b:
        sub = b.subscribe()
        assert "1 subscribers" in repr(b)
    assert sub.close_reason is CloseReason.SHUTDOWN
    assert b.stats().subscribers == 0


def test_max_subscribers_refuses_one_more_until_a_slot_frees() -> None:
    """Beyond max_subscribers subscribe raises; closing or evicting one frees its slot."""
    with Broadcaster(max_subscribers=2) as b:
        first = b.subscribe()
        slow = b.subscribe(queue_size=1)
        with pytest.raises(TooManySubscribersError, match="already 2 subscribers") as caught:
            b.subscribe()
        assert isinstance(caught.value, RuntimeError)
        first.close()
        replacement = b.subscribe()
        b.publish("t", 1)
        b.publish("t", 2)  # evicts the slow one
        assert slow.close_reason is CloseReason.EVICTED
        b.subscribe()
        assert b.stats().subscribers == 2
        replacement.close()


def test_stats_count_each_event_once_per_subscriber(broadcaster: Broadcaster) -> None:
    """Published counts events, delivered counts frames handed to subscribers."""
    subs = [broadcaster.subscribe("a"), broadcaster.subscribe("a", "b"), broadcaster.subscribe("b")]
    broadcaster.publish("t", 1, channel="a")
    broadcaster.publish("t", 1, channel="b")
    broadcaster.publish("t", 1, channel="none")
    with pytest.raises(PublishError):
        broadcaster.publish("t", math.nan)
    assert broadcaster.stats() == Stats(
        subscribers=3,
        published=3,
        delivered=4,
        evicted=0,
        rejected=1,
        revoked=0,
        expired=0,
        refused=0,
    )
    subs[0].close()
    assert broadcaster.stats().subscribers == 2


# -- resume -------------------------------------------------------------------------------


def _first_event(sub: Subscription) -> ParsedEvent:
    return _events(sub.read_nowait())[0]


def test_resume_replays_exactly_the_events_after_the_id(broadcaster: Broadcaster) -> None:
    """A client back with Last-Event-ID gets what it missed, then live events."""
    published = [broadcaster.publish("t", n) for n in range(5)]
    with broadcaster.subscribe(last_event_id=published[1].id) as sub:
        live = broadcaster.publish("t", 5)
        assert _ids(sub.read_nowait()) == [event.id for event in [*published[2:], live]]


def test_resume_from_the_newest_id_replays_nothing_and_reports_no_gap(
    broadcaster: Broadcaster,
) -> None:
    """A client that missed nothing just goes on live."""
    newest = broadcaster.publish("t", 1)
    with broadcaster.subscribe(last_event_id=newest.id) as sub:
        assert sub.read_nowait() == b""


def test_an_empty_last_event_id_starts_live(broadcaster: Broadcaster) -> None:
    """``last_event_id=""`` (a header with no value) is no resume at all."""
    broadcaster.publish("t", 1)
    with broadcaster.subscribe(last_event_id="") as sub:
        assert sub.read_nowait() == b""


def test_resume_replays_only_the_subscribed_channels(broadcaster: Broadcaster) -> None:
    """Events on other channels published meanwhile are not replayed."""
    start = broadcaster.publish("t", 0, channel="a")
    wanted = broadcaster.publish("t", 1, channel="a")
    broadcaster.publish("t", 2, channel="b")
    with broadcaster.subscribe("a", last_event_id=start.id) as sub:
        assert sub.read_nowait() == wanted.frame


def test_replay_under_concurrent_publishing_has_no_gap_and_no_duplicate() -> None:
    """Clients resuming while a thread publishes get every later event exactly once, in order."""
    # The publisher stops once the clients are done; the limit only bounds a runaway.
    limit = 100_000
    with Broadcaster(history=limit, queue_size=limit) as b:
        published: list[Event] = []
        stop = threading.Event()

        def publisher() -> None:
            for number in range(limit):
                if stop.is_set():
                    return
                published.append(b.publish("t", number))

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        resumed: list[tuple[int, Subscription]] = []
        while len(resumed) < 40 and thread.is_alive():
            if len(published) < 2:
                continue
            index = len(published) - 1 if len(resumed) % 2 else len(published) // 2
            resumed.append((index, b.subscribe(last_event_id=published[index].id)))
        stop.set()
        thread.join(JOIN_TIMEOUT)
        assert not thread.is_alive()
        assert len(resumed) >= 10, "the publisher finished before the clients resumed"
        all_ids = [event.id for event in published]
        concurrent = 0
        for index, sub in resumed:
            received = _ids(sub.read_nowait())
            assert received == all_ids[index + 1 :]
            concurrent += len(received) > 0
        assert b.stats().evicted == 0
    assert concurrent > 0


def test_replayed_events_do_not_count_against_queue_size() -> None:
    """A long replay does not evict; only live frames count toward queue_size."""
    with Broadcaster(queue_size=2, history=100) as b:
        published = [b.publish("t", n) for n in range(20)]
        sub = b.subscribe(last_event_id=published[0].id)
        b.publish("t", 20)
        b.publish("t", 21)
        assert sub.close_reason is None
        b.publish("t", 22)
        assert sub.close_reason is CloseReason.EVICTED


def _assert_gap(sub: Subscription, newest: str) -> None:
    events = _events(sub.read_nowait())
    assert [event.type for event in events] == [GAP_EVENT_TYPE]
    assert events[0].last_event_id == newest


def test_an_unknown_id_begins_the_stream_with_a_gap_event(broadcaster: Broadcaster) -> None:
    """The page learns it missed events it cannot get back, then goes on live."""
    newest = broadcaster.publish("t", 1)
    with broadcaster.subscribe(last_event_id="never-issued") as sub:
        _assert_gap(sub, newest.id)
        live = broadcaster.publish("t", 2)
        assert sub.read_nowait() == live.frame


def test_an_id_trimmed_from_history_gives_a_gap() -> None:
    """An id older than the history ring cannot be resumed."""
    with Broadcaster(history=3) as b:
        published = [b.publish("t", n) for n in range(5)]
        with b.subscribe(last_event_id=published[0].id) as sub:
            _assert_gap(sub, published[-1].id)
        with b.subscribe(last_event_id=published[2].id) as sub:
            assert _ids(sub.read_nowait()) == [event.id for event in published[3:]]


@pytest.mark.parametrize("size", [1, 3])
def test_resume_from_just_before_the_oldest_kept_event_replays_the_whole_ring(size: int) -> None:
    """When every event after the id is still in history, resume works without a gap."""
    with Broadcaster(history=size) as b:
        published = [b.publish("t", n) for n in range(size + 1)]
        with b.subscribe(last_event_id=published[0].id) as sub:
            assert sub.read_nowait() == b"".join(event.frame for event in published[1:])


def test_an_id_from_another_broadcaster_gives_a_gap() -> None:
    """Ids are not comparable across broadcasters (or runs of the process)."""
    with Broadcaster() as other, Broadcaster() as b:
        foreign = other.publish("t", 1)
        newest = b.publish("t", 1)
        with b.subscribe(last_event_id=foreign.id) as sub:
            _assert_gap(sub, newest.id)


def test_without_history_every_resume_is_a_gap() -> None:
    """``history=0`` keeps nothing to replay, even the newest event."""
    with Broadcaster(history=0) as b:
        seen = b.publish("t", 1)
        newest = b.publish("t", 2)
        with b.subscribe(last_event_id=seen.id) as sub:
            _assert_gap(sub, newest.id)


def test_a_client_that_saw_the_newest_event_resumes_without_a_gap_even_without_history() -> None:
    """Nothing was missed, so an idle client that reconnects is not told to reload."""
    with Broadcaster(history=0) as b:
        newest = b.publish("t", 1)
        with b.subscribe(last_event_id=newest.id) as sub:
            assert sub.read_nowait() == b""
            event = b.publish("t", 2)
            assert sub.read_nowait() == event.frame


def test_a_gap_before_any_event_leaves_the_clients_last_id_alone(
    broadcaster: Broadcaster,
) -> None:
    """With nothing published yet the gap has no id, so a reconnect is told of the gap again."""
    for _ in range(2):
        with broadcaster.subscribe(last_event_id="stale") as sub:
            chunk = sub.read_nowait()
        assert b"id:" not in chunk
        assert [event.type for event in parse(chunk).events] == [GAP_EVENT_TYPE]


def test_reconnecting_after_a_gap_resumes_from_the_gap(broadcaster: Broadcaster) -> None:
    """The gap carries the newest id, so the next reconnect replays from there without a gap."""
    broadcaster.publish("t", 1)
    with broadcaster.subscribe(last_event_id="unknown") as sub:
        gap_id = _first_event(sub).last_event_id
    missed = broadcaster.publish("t", 2)
    with broadcaster.subscribe(last_event_id=gap_id) as sub:
        assert sub.read_nowait() == missed.frame


def test_retry_prelude_comes_first_even_before_a_replay_or_a_gap() -> None:
    """With retry set, every stream begins with ``retry: N``."""
    with Broadcaster(retry=3000) as b:
        first = b.publish("t", 1)
        second = b.publish("t", 2)
        with b.subscribe() as fresh:
            assert fresh.read_nowait() == b"retry: 3000\n\n"
        with b.subscribe(last_event_id=first.id) as resumed:
            assert resumed.read_nowait() == b"retry: 3000\n\n" + second.frame
        with b.subscribe(last_event_id="unknown") as gapped:
            chunk = gapped.read_nowait()
            assert chunk.startswith(b"retry: 3000\n\n")
            assert parse(chunk).retry == 3000
            assert [event.type for event in parse(chunk).events] == [GAP_EVENT_TYPE]


# -- logging ------------------------------------------------------------------------------


def test_evictions_and_rejections_are_logged_without_the_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Operators see who was evicted and why a publish failed, never the data itself."""
    secret = "s3cr3t-payload"
    caplog.set_level(logging.INFO, logger="ssecast")
    with Broadcaster(max_payload_bytes=64, event_types=["t"]) as b:
        slow = b.subscribe("prices", queue_size=1)
        b.publish("t", {"secret": secret}, channel="prices")
        b.publish("t", {"secret": secret}, channel="prices")
        assert slow.close_reason is CloseReason.EVICTED
        with pytest.raises(PayloadTooLargeError):
            b.publish("t", {"secret": secret * 10})
        with pytest.raises(NotSerializableError):
            b.publish("t", {"secret": secret, "x": math.nan})
        with pytest.raises(UnknownEventTypeError):
            b.publish("other", {"secret": secret})
    records = [record for record in caplog.records if record.name == "ssecast"]
    evictions = [record for record in records if "evicted" in record.getMessage()]
    rejections = [record for record in records if "rejected" in record.getMessage()]
    assert len(evictions) == 1
    assert evictions[0].levelno == logging.INFO
    assert "prices" in evictions[0].getMessage()
    assert len(rejections) == 3
    assert all(record.levelno == logging.INFO for record in rejections)
    assert all(secret not in record.getMessage() for record in records)


def test_a_log_handler_that_publishes_does_not_deadlock_with_another_publishing_thread() -> None:
    """A handler that streams ssecast's log records (a live log viewer) may publish.

    Here one thread logs through it while another evicts: the handler holds its lock while
    it publishes, and the other thread's publish logs an eviction, which needs that lock
    (and runs the handler inside that publish). ssecast logs once its locks are released.
    """
    b = Broadcaster(queue_size=1, heartbeat=None)
    viewer = b.subscribe("logs", queue_size=10_000)

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            b.publish("log", record.getMessage(), channel="logs", raw=True)

    ssecast_logger = logging.getLogger("ssecast")
    handler, level = Forward(), ssecast_logger.level
    ssecast_logger.addHandler(handler)
    ssecast_logger.setLevel(logging.INFO)

    def evict() -> None:
        for n in range(300):
            b.subscribe("app")  # never read: the second event evicts it
            b.publish("t", n, channel="app")
            b.publish("t", n, channel="app")

    def log() -> None:
        for n in range(300):
            ssecast_logger.info("tick %d", n)

    threads = [threading.Thread(target=work, daemon=True) for work in (evict, log)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)  # both finish in well under a second
        assert not any(thread.is_alive() for thread in threads), "deadlocked"
    finally:
        ssecast_logger.removeHandler(handler)
        ssecast_logger.setLevel(level)
    logged = viewer.read_nowait()
    assert logged.count(b"evicted a subscriber") == 300
    assert logged.count(b"tick") == 300
    b.close()
