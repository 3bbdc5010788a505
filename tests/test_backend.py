"""The Backend protocol and the in-memory backend (ssecast._backend), seen from a Broadcaster."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from sse_parser import parse
from ssecast import (
    GAP_EVENT_TYPE,
    Ahead,
    Backend,
    BackendUnavailableError,
    Broadcaster,
    BroadcasterClosedError,
    CloseReason,
    Deliver,
    Draft,
    Event,
    InvalidFieldError,
    MemoryBackend,
    ReportGap,
    Subscription,
    TooManySubscribersError,
)
from ssecast._subscription import feed_of

JOIN_TIMEOUT = 10.0


def _draft(data: str = "1", channel: str = "default") -> Draft:
    return Draft("t", channel, data, b"event: t\ndata: " + data.encode() + b"\n\n")


class LoggingBackend:
    """A whole backend in a few lines: it keeps every event, so it can replay any of them.

    It stands for a backend with a longer memory than the broadcaster's ring (as the Redis
    one has), and records what the broadcaster asks of it.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.deliver: Deliver | None = None
        self.report_gap: ReportGap | None = None
        self.starts = 0
        self.listen_threads: list[int] = []
        self.closes: list[str] = []
        self.replays: list[tuple[str, str | None, frozenset[str]]] = []
        self.unavailable = False
        self.slow_listen = 0.0
        self.replay_threads: list[int] = []
        # Runs inside replay, standing for what happens elsewhere while the backend does I/O.
        self.during_replay: Callable[[], object] = lambda: None
        self._lock = threading.Lock()

    def start(self, deliver: Deliver, report_gap: ReportGap) -> None:
        self.starts += 1
        self.deliver = deliver
        self.report_gap = report_gap

    def listen(self) -> None:
        # A backend connecting over the network takes a while; concurrent first users wait.
        time.sleep(self.slow_listen)
        if self.unavailable:
            raise BackendUnavailableError("the store is down")
        self.listen_threads.append(threading.get_ident())

    def publish(self, draft: Draft) -> Event:
        if self.unavailable:
            raise BackendUnavailableError("the store is down")
        assert self.deliver is not None
        with self._lock:
            event = draft.stamp(f"log-{len(self.events) + 1}")
            self.events.append(event)
            self.deliver(event)
        return event

    async def apublish(self, draft: Draft) -> Event:
        return self.publish(draft)

    def replay(self, after: str, until: str | None, channels: frozenset[str]) -> list[Event] | None:
        self.replays.append((after, until, channels))
        self.replay_threads.append(threading.get_ident())
        self.during_replay()
        if self.unavailable:
            raise BackendUnavailableError("the store is down")
        ids = [event.id for event in self.events]
        if after not in ids:
            return None
        end = len(ids) if until is None else ids.index(until) + 1
        return [e for e in self.events[ids.index(after) + 1 : end] if e.channel in channels]

    def check(self) -> None:
        if self.unavailable:
            raise BackendUnavailableError("the store is down")

    @property
    def available(self) -> bool:
        return not self.unavailable

    def close(self) -> None:
        self.closes.append("close")

    async def aclose(self) -> None:
        self.closes.append("aclose")


# -- the in-memory backend ----------------------------------------------------------------


def test_both_backends_satisfy_the_protocol() -> None:
    """The default backend and a hand-written one are both Backends."""
    assert isinstance(MemoryBackend(), Backend)
    assert isinstance(LoggingBackend(), Backend)


async def test_check_and_stats_report_what_the_backend_says() -> None:
    """check() passes the backend's verdict on, and stats() its last known state."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend) as b:
        b.check()
        await b.acheck()
        assert b.stats().backend_up is True
        backend.unavailable = True
        with pytest.raises(BackendUnavailableError):
            b.check()
        with pytest.raises(BackendUnavailableError):
            await b.acheck()
        assert b.stats().backend_up is False
    with pytest.raises(BroadcasterClosedError):
        b.check()


def test_the_memory_backend_is_always_available() -> None:
    """With nothing to reach, the check passes and the backend is always up."""
    backend = MemoryBackend()
    backend.check()
    assert backend.available is True


def test_memory_backend_refuses_to_publish_before_start() -> None:
    """Publishing through a backend nobody started is a programming error, said plainly."""
    with pytest.raises(RuntimeError, match=r"before start\(\)"):
        MemoryBackend().publish(_draft())


def test_memory_backend_delivers_each_event_once_in_id_order() -> None:
    """Every published draft is stamped with a new id and delivered at once, in order."""
    backend = MemoryBackend()
    delivered: list[Event] = []
    backend.start(delivered.append, lambda: None)
    events = [backend.publish(_draft(str(number))) for number in range(3)]
    events.append(asyncio.run(backend.apublish(_draft("3"))))
    assert delivered == events
    assert [event.data for event in events] == ["0", "1", "2", "3"]
    assert len({event.id for event in events}) == 4
    assert all(parse(event.frame).events[0].last_event_id == event.id for event in events)


def test_memory_backends_never_share_ids_and_replay_nothing() -> None:
    """Each instance has its own id space; beyond the ring there is no history."""
    one, two = MemoryBackend(), MemoryBackend()
    one.start(lambda event: None, lambda: None)
    two.start(lambda event: None, lambda: None)
    first = one.publish(_draft())
    assert first.id != two.publish(_draft()).id
    assert one.replay(first.id, None, frozenset({"default"})) is None
    one.close()
    asyncio.run(one.aclose())


# -- what the broadcaster asks of a backend -----------------------------------------------


def test_the_backend_starts_with_the_broadcaster_and_listens_once_on_first_subscribe() -> None:
    """The constructor starts the backend (no I/O); the first subscribe has it listen, once."""
    backend = LoggingBackend()
    b = Broadcaster(backend=backend)
    assert (backend.starts, backend.listen_threads) == (1, [])
    b.subscribe()
    b.publish("t", 1)
    b.subscribe()
    assert backend.starts == 1
    assert backend.listen_threads == [threading.get_ident()]
    b.close()
    b.close()
    assert backend.closes == ["close"]


def test_one_backend_serves_one_broadcaster() -> None:
    """A backend handed to a second broadcaster is refused at once, by the Redis backend too."""
    backend = RefusingSecondStart()
    Broadcaster(backend=backend)
    with pytest.raises(RuntimeError, match="one broadcaster"):
        Broadcaster(backend=backend)


class RefusingSecondStart(LoggingBackend):
    def start(self, deliver: Deliver, report_gap: ReportGap) -> None:
        if self.starts:
            raise RuntimeError("this backend serves one broadcaster")
        super().start(deliver, report_gap)


def test_a_broadcaster_that_only_publishes_never_listens() -> None:
    """Publishing asks the backend for nobody's events: no reader is needed."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend) as b:
        b.publish("t", 1)
        asyncio.run(b.apublish("t", 2))
        assert backend.listen_threads == []
        assert b.stats().published == 2


async def test_asubscribe_has_the_backend_listen_off_the_event_loop() -> None:
    """The first asubscribe lets the backend connect in another thread, once."""
    backend = LoggingBackend()
    async with Broadcaster(backend=backend) as b:
        await b.asubscribe()
        await b.asubscribe()
        b.subscribe()
    assert len(backend.listen_threads) == 1
    assert backend.listen_threads != [threading.get_ident()]


def test_a_backend_that_cannot_listen_fails_subscribe_until_it_can() -> None:
    """An unreachable backend fails the subscribe that needed it; a later one tries again."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend) as b:
        backend.unavailable = True
        with pytest.raises(BackendUnavailableError, match="the store is down"):
            b.subscribe()
        assert b.stats().subscribers == 0
        backend.unavailable = False
        with b.subscribe() as sub:
            event = b.publish("t", 1)
            assert sub.read_nowait() == event.frame
    assert len(backend.listen_threads) == 1


def _run_together(*calls: Callable[[], object]) -> list[BaseException | None]:
    """Run each call in a thread of its own, all at once; return what each raised."""
    barrier = threading.Barrier(len(calls))
    raised: list[BaseException | None] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait(JOIN_TIMEOUT)
        try:
            calls[index]()
        except BaseException as error:
            raised[index] = error

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    return raised


def test_concurrent_first_subscribes_have_the_backend_listen_once() -> None:
    """Subscribers that arrive while the backend connects wait for it; it listens once."""
    backend = LoggingBackend()
    backend.slow_listen = 0.05
    b = Broadcaster(backend=backend)
    subs: list[Subscription] = []
    assert _run_together(*[lambda: subs.append(b.subscribe()) for _ in range(6)]) == [None] * 6
    assert len(backend.listen_threads) == 1
    assert b.stats().subscribers == 6
    b.close()


def test_subscribers_waiting_for_a_failed_listen_share_its_failure() -> None:
    """When the backend cannot connect, those who waited fail too, instead of each retrying."""
    backend = LoggingBackend()
    backend.slow_listen = 0.1
    backend.unavailable = True
    with Broadcaster(backend=backend) as b:
        raised = _run_together(*[b.subscribe for _ in range(4)])
        assert all(isinstance(error, BackendUnavailableError) for error in raised)
        assert b.stats().subscribers == 0


def test_publishing_goes_on_while_the_backend_connects_for_a_subscriber() -> None:
    """A slow listen holds no lock: other threads publish meanwhile, and close() is not stuck."""
    backend = LoggingBackend()
    backend.slow_listen = 1.0
    b = Broadcaster(backend=backend)
    raised: list[BaseException] = []

    def subscribe() -> None:
        with pytest.raises(BroadcasterClosedError) as caught:
            b.subscribe()
        raised.append(caught.value)

    subscriber = threading.Thread(target=subscribe, daemon=True)
    subscriber.start()
    time.sleep(0.05)  # it is in listen() now
    published = b.publish("t", 1)
    b.close()  # while listen() is still running
    assert backend.events == [published]
    assert backend.closes == ["close"]
    subscriber.join(JOIN_TIMEOUT)
    assert len(raised) == 1  # the subscribe finished after close(): it got nothing


def test_a_closed_broadcaster_does_not_begin_listening() -> None:
    """After close(), a first subscribe raises at once and asks the backend for nothing."""
    backend = LoggingBackend()
    b = Broadcaster(backend=backend)
    b.publish("t", 1)
    b.close()
    with pytest.raises(BroadcasterClosedError):
        b.subscribe()
    assert backend.listen_threads == []
    assert backend.closes == ["close"]


async def test_aclose_closes_the_backend_without_blocking() -> None:
    """The async close awaits the backend's own async close."""
    backend = LoggingBackend()
    b = Broadcaster(backend=backend)
    await b.aclose()
    await b.aclose()
    assert backend.closes == ["aclose"]


def test_resume_beyond_the_ring_is_filled_in_by_the_backend() -> None:
    """An id older than the broadcaster's ring is replayed from the backend, then live."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=2) as b:
        published = [
            b.publish("t", number, channel="a" if number % 2 else "b") for number in range(8)
        ]
        with b.subscribe("a", last_event_id=published[0].id) as sub:
            live = b.publish("t", 9, channel="a")
            expected = [*(event for event in published[1:] if event.channel == "a"), live]
            assert sub.read_nowait() == b"".join(event.frame for event in expected)
    assert backend.replays == [(published[0].id, published[-1].id, frozenset({"a"}))]


def test_an_id_the_backend_does_not_know_either_gives_a_gap() -> None:
    """When neither the ring nor the backend has the id, the stream begins with a gap."""
    with Broadcaster(backend=LoggingBackend(), history=2) as b:
        newest = b.publish("t", 1)
        with b.subscribe(last_event_id="elsewhere-7") as sub:
            events = parse(sub.read_nowait()).events
    assert [(event.type, event.last_event_id) for event in events] == [(GAP_EVENT_TYPE, newest.id)]


def test_a_backend_failing_during_resume_fails_subscribe_and_leaves_no_subscriber() -> None:
    """BackendUnavailableError (a ConnectionError) reaches the caller; nothing stays registered."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=1) as b:
        first = b.publish("t", 1)
        b.publish("t", 2)
        b.publish("t", 3)
        backend.unavailable = True
        with pytest.raises(ConnectionError, match="the store is down"):
            b.subscribe(last_event_id=first.id)
        assert b.stats().subscribers == 0


def test_a_backend_failing_to_publish_sends_nothing() -> None:
    """When the backend cannot take the event, publish raises and no subscriber sees it."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend) as b:
        sub = b.subscribe()
        backend.unavailable = True
        with pytest.raises(BackendUnavailableError):
            b.publish("t", 1)
        assert sub.read_nowait() == b""
        assert b.stats().published == 0


def test_events_the_backend_brings_from_elsewhere_reach_subscribers() -> None:
    """Events published by another process arrive through deliver like local ones."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend) as b:
        sub = b.subscribe()
        remote = _draft("from-another-process").stamp("remote-1")
        assert backend.deliver is not None
        backend.deliver(remote)
        assert sub.read_nowait() == remote.frame
        assert b.stats().delivered == 1
    with pytest.raises(BroadcasterClosedError):  # the backend should stop delivering
        backend.deliver(_draft().stamp("remote-2"))
    assert sub.read_nowait() == b""
    assert b.stats().delivered == 1


def _frames(events: list[Event]) -> bytes:
    return b"".join(event.frame for event in events)


def test_events_published_while_the_backend_replays_follow_the_replay() -> None:
    """What other threads publish during the backend's I/O comes after the replay, once each."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=2) as b:
        published = [b.publish("t", number) for number in range(5)]
        backend.during_replay = lambda: published.extend(b.publish("t", n) for n in (5, 6))
        with b.subscribe(last_event_id=published[0].id) as sub:
            assert sub.read_nowait() == _frames(published[1:])


def test_more_events_during_a_replay_than_the_ring_holds_are_asked_for_again() -> None:
    """A reader catching up during the backend's I/O: the backend is asked again, no gap."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=2) as b:
        published = [b.publish("t", number) for number in range(5)]

        def catch_up() -> None:
            backend.during_replay = lambda: None
            published.extend(b.publish("t", n) for n in range(5, 9))

        backend.during_replay = catch_up
        with b.subscribe(last_event_id=published[0].id) as sub:
            assert sub.read_nowait() == _frames(published[1:])
    assert [until for _, until, _ in backend.replays] == [published[4].id, published[8].id]


def test_a_disconnect_during_the_backend_read_ends_the_resumes_it_matches() -> None:
    """Revoked while its history is read: it comes out ended; another key's resume lives."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=1) as b:
        published = [b.publish("t", number) for number in range(3)]
        backend.during_replay = lambda: b.disconnect(key="alice")
        revoked = b.subscribe(last_event_id=published[0].id, key="alice")
        kept = b.subscribe(last_event_id=published[0].id, key="bob")
        assert revoked.close_reason is CloseReason.REVOKED
        assert revoked.read_nowait() == b""
        assert kept.close_reason is None
        assert kept.read_nowait() == _frames(published[1:])
        assert (b.stats().revoked, b.stats().subscribers) == (1, 1)


def test_more_events_during_every_replay_than_the_ring_holds_give_a_gap() -> None:
    """If the ring lost some of what arrived during each backend read, the client is told."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=2) as b:
        published = [b.publish("t", number) for number in range(5)]
        backend.during_replay = lambda: published.extend(b.publish("t", n) for n in range(5, 9))
        with b.subscribe(last_event_id=published[0].id) as sub:
            events = parse(sub.read_nowait()).events
    assert [(event.type, event.last_event_id) for event in events] == [
        (GAP_EVENT_TYPE, published[-1].id)
    ]


def test_an_id_delivered_while_the_backend_replays_resumes_without_a_gap() -> None:
    """An id this process had not delivered yet (another process was first) resumes exactly."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend) as b:
        b.publish("t", 0)
        remote = _draft("remote").stamp("remote-1")
        assert backend.deliver is not None
        deliver = backend.deliver
        backend.during_replay = lambda: deliver(remote)
        with b.subscribe(last_event_id=remote.id) as sub:
            assert sub.read_nowait() == b""
            live = b.publish("t", 1)
            assert sub.read_nowait() == live.frame


def test_closing_the_broadcaster_during_a_replay_fails_that_subscribe() -> None:
    """A subscribe that finishes after close() raises BroadcasterClosedError, leaving nothing."""
    backend = LoggingBackend()
    b = Broadcaster(backend=backend, history=1)
    published = [b.publish("t", number) for number in range(3)]
    backend.during_replay = b.close
    with pytest.raises(BroadcasterClosedError):
        b.subscribe(last_event_id=published[0].id)
    assert b.stats().subscribers == 0


def test_the_subscriber_limit_is_checked_again_after_a_replay() -> None:
    """Slots taken by others during the backend's I/O count: max_subscribers is never exceeded."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=1, max_subscribers=1) as b:
        published = [b.publish("t", number) for number in range(3)]
        taken: list[Subscription] = []
        backend.during_replay = lambda: taken.append(b.subscribe())
        with pytest.raises(TooManySubscribersError):
            b.subscribe(last_event_id=published[0].id)
        assert b.stats().subscribers == 1


async def test_asubscribe_runs_the_backend_replay_off_the_event_loop() -> None:
    """The awaitable subscribe asks the backend from another thread, then resumes exactly."""
    backend = LoggingBackend()
    async with Broadcaster(backend=backend, history=2) as b:
        published = [await b.apublish("t", number) for number in range(5)]
        async with await b.asubscribe(last_event_id=published[0].id) as sub:
            assert sub.read_nowait() == _frames(published[1:])
    assert backend.replay_threads != [threading.get_ident()]
    assert len(backend.replay_threads) == 1


async def test_asubscribe_from_the_ring_or_live_asks_no_backend() -> None:
    """Resumes the ring can serve, and fresh subscriptions, do no backend I/O at all."""
    backend = LoggingBackend()
    async with Broadcaster(backend=backend) as b:
        first = await b.apublish("t", 1)
        second = await b.apublish("t", 2)
        resumed = await b.asubscribe(last_event_id=first.id)
        fresh = await b.asubscribe("default", queue_size=5)
        third = await b.apublish("t", 3)
        assert resumed.read_nowait() == second.frame + third.frame
        assert fresh.read_nowait() == third.frame
    assert backend.replays == []


async def test_asubscribe_with_an_id_the_memory_backend_cannot_know_gives_a_gap_at_once() -> None:
    """The default backend keeps nothing beyond the ring: a stale id is a gap, no thread."""
    async with Broadcaster(history=1) as b:
        stale = await b.apublish("t", 1)
        await b.apublish("t", 2)
        newest = await b.apublish("t", 3)
        async with await b.asubscribe(last_event_id=stale.id) as sub:
            (gap,) = parse(sub.read_nowait()).events
            assert (gap.type, gap.last_event_id) == (GAP_EVENT_TYPE, newest.id)


def _frames_of(sub: Subscription) -> list[tuple[str, str]]:
    return [(event.type, event.data) for event in parse(sub.read_nowait()).events]


def test_a_gap_the_backend_reports_reaches_every_subscriber_before_the_next_event() -> None:
    """report_gap(): a gap for each subscriber, once; the full ones are evicted and logged."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, queue_size=2, heartbeat=None) as b:
        one, both = b.subscribe("a"), b.subscribe("a", "b")
        full = b.subscribe("b")
        b.publish("t", 1, channel="b")
        b.publish("t", 2, channel="b")  # full holds two frames now, the most it may
        both.read_nowait()
        assert backend.report_gap is not None
        backend.report_gap()
        b.publish("t", 3, channel="a")
        assert _frames_of(one) == [(GAP_EVENT_TYPE, "{}"), ("t", "3")]
        assert _frames_of(both) == [(GAP_EVENT_TYPE, "{}"), ("t", "3")]
        assert full.close_reason is CloseReason.EVICTED
        assert b.stats().evicted == 1
    with pytest.raises(BroadcasterClosedError):
        backend.report_gap()


def test_an_eviction_found_by_a_backend_thread_is_logged_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outside any publish call (a backend's reader thread), an eviction is logged there."""
    caplog.set_level(logging.INFO, logger="ssecast")
    backend = LoggingBackend()
    with Broadcaster(backend=backend, queue_size=1) as b:
        slow = b.subscribe()
        assert backend.deliver is not None
        for n in range(2):
            thread = threading.Thread(target=backend.deliver, args=(_draft().stamp(f"r-{n}"),))
            thread.start()
            thread.join(JOIN_TIMEOUT)
        assert slow.close_reason is CloseReason.EVICTED
    assert "evicted a subscriber" in caplog.text


class AheadBackend(LoggingBackend):
    """Says Ahead for an id of its log it has not delivered yet, as a lagging reader would."""

    def __init__(self) -> None:
        super().__init__()
        self.held_back: list[Event] = []  # published elsewhere, not yet delivered here

    def elsewhere(self, data: str) -> Event:
        event = _draft(data).stamp(f"log-{len(self.events) + 1:03}")
        self.events.append(event)
        self.held_back.append(event)
        return event

    def catch_up(self, *, losing: int = 0) -> None:
        """Deliver what was held back, all but the first ``losing`` (after a gap)."""
        assert self.deliver is not None
        assert self.report_gap is not None
        if losing:
            self.report_gap()
        for event in self.held_back[losing:]:
            self.deliver(event)
        self.held_back.clear()

    def replay(self, after: str, until: str | None, channels: frozenset[str]) -> Any:
        if after in {event.id for event in self.held_back}:
            return Ahead(lambda event_id: event_id > after)  # its ids sort in order
        return super().replay(after, until, channels)


def test_a_resume_from_an_id_delivered_elsewhere_first_waits_for_it_here() -> None:
    """No gap and no event twice: the subscription starts right after that id, once it comes."""
    backend = AheadBackend()
    with Broadcaster(backend=backend, history=1) as b:
        early = backend.elsewhere("seen elsewhere")
        seen = backend.elsewhere("the client's last")
        with b.subscribe(last_event_id=seen.id) as sub, b.subscribe() as other:
            assert sub.read_nowait() == b""  # held: nothing yet
            chunks: list[bytes] = []
            reader = threading.Thread(target=lambda: chunks.append(next(sub)), daemon=True)
            reader.start()
            while not feed_of(sub).waiting:  # a reader waits on it while it is held
                time.sleep(0.001)
            backend.catch_up()
            assert other.read_nowait() == early.frame + seen.frame
            live = b.publish("t", 1)
            reader.join(JOIN_TIMEOUT)
            assert chunks == [live.frame]  # it saw the first two, and is woken by the third
            assert b.stats().subscribers == 2


def test_a_held_subscription_whose_event_was_lost_gets_the_gap_and_what_follows_it() -> None:
    """Lost with the events before it: a gap, then the first event after it, nothing older."""
    backend = AheadBackend()
    with Broadcaster(backend=backend, heartbeat=None) as b:
        before = backend.elsewhere("lost, and the client saw it")
        awaited = backend.elsewhere("lost, the client's last")
        after = backend.elsewhere("after the hole")
        held = b.subscribe(last_event_id=awaited.id)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(next(held)), daemon=True)
        reader.start()  # a reader waits while it is held: the gap wakes it
        backend.catch_up(losing=2)
        reader.join(JOIN_TIMEOUT)
        assert not reader.is_alive()
        got = parse(chunks[0] + held.read_nowait()).events
        assert [(e.type, e.data) for e in got] == [(GAP_EVENT_TYPE, "{}"), ("t", after.data)]
        assert before.id < awaited.id


def test_a_gap_before_the_awaited_event_keeps_the_hold_and_sends_nothing_twice() -> None:
    """A hole before the client's id: it is told, and it still begins after its own id."""
    backend = AheadBackend()
    with Broadcaster(backend=backend, heartbeat=None) as b:
        backend.elsewhere("lost")
        backend.elsewhere("seen by the client, not lost")
        awaited = backend.elsewhere("the client's last")
        held = b.subscribe(last_event_id=awaited.id)
        backend.catch_up(losing=1)
        live = b.publish("t", 1)
        assert _frames_of(held) == [(GAP_EVENT_TYPE, "{}"), ("t", "1")]
        assert live.id


def test_closing_a_held_subscription_or_the_broadcaster_ends_it() -> None:
    """A held subscription closes like any other, and a shutdown ends it."""
    backend = AheadBackend()
    b = Broadcaster(backend=backend)
    awaited = backend.elsewhere("a")
    one, same = (b.subscribe(last_event_id=awaited.id) for _ in range(2))
    two = b.subscribe(last_event_id=backend.elsewhere("b").id)
    one.close()
    assert b.stats().subscribers == 2
    same.close()
    assert b.stats().subscribers == 1
    b.close()
    assert two.close_reason is CloseReason.SHUTDOWN
    assert next(two, None) is None


def test_every_refusal_for_a_while_is_counted_and_nothing_else() -> None:
    """stats().refused counts subscribe calls that were full, closed or without a backend."""
    backend = LoggingBackend()
    with Broadcaster(backend=backend, history=1, max_subscribers=2) as b:

        async def subscribe_async(last_event_id: str | None = None) -> None:
            await b.asubscribe(last_event_id=last_event_id)

        backend.unavailable = True
        with pytest.raises(BackendUnavailableError):
            b.subscribe()  # listening fails
        with pytest.raises(BackendUnavailableError):
            asyncio.run(subscribe_async())
        backend.unavailable = False
        b.subscribe().close()  # listening now
        first = b.publish("t", 1)
        b.publish("t", 2)
        b.publish("t", 3)
        backend.unavailable = True
        with pytest.raises(BackendUnavailableError):
            b.subscribe(last_event_id=first.id)  # resuming past the ring needs the backend
        with pytest.raises(BackendUnavailableError):
            asyncio.run(subscribe_async(first.id))
        backend.unavailable = False
        with pytest.raises(InvalidFieldError):
            b.subscribe("bad\nchannel")  # permanent: not counted
        b.subscribe()
        b.subscribe()
        with pytest.raises(TooManySubscribersError):
            b.subscribe()
        assert b.stats().refused == 5
    with pytest.raises(BroadcasterClosedError):
        b.subscribe()
    assert b.stats().refused == 6
