"""The backend contract: what every backend must do, run against each (see backends.py).

A client resumes exactly or gets ``ssecast.gap``, never a silent hole; ids are unique
across processes and forks; nothing blocks an event loop; nothing grows with the loops
that used a broadcaster. A new backend adds a harness to backends.py and passes this
module unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from backends import HARNESSES, Harness
from reading import READ_SECONDS, Client
from servers import PYTHON, TESTS
from sse_parser import ParsedEvent
from ssecast import (
    GAP_EVENT_TYPE,
    BackendUnavailableError,
    Broadcaster,
    BroadcasterClosedError,
    Event,
    Subscription,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

PYTHONPATH = list(filter(None, [os.environ.get("PYTHONPATH")]))


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Each backend in turn, on a store no other test uses."""
    made = HARNESSES[request.param]()
    yield made
    made.close()


@pytest.fixture(params=[name for name in sorted(HARNESSES) if HARNESSES[name].shares_events])
def shared(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Each backend whose store carries events between processes."""
    made = HARNESSES[request.param]()
    yield made
    made.close()


def read(sub: Subscription, count: int) -> list[ParsedEvent]:
    """Read ``sub`` until ``count`` events arrived; return them all."""
    return Client(sub).events(count)


def summary(events: list[ParsedEvent]) -> list[tuple[str, str]]:
    return [(event.type, event.data) for event in events]


def published(events: list[Event]) -> list[tuple[str, str]]:
    return [(event.type, event.data) for event in events]


# -- order and ids ---------------------------------------------------------------------


def test_every_subscriber_gets_each_event_once_in_one_order_per_channel(harness: Harness) -> None:
    """Four threads publish on two channels; every subscriber agrees on each channel's order."""
    with harness.broadcaster(queue_size=1000) as b, harness.broadcaster() as other:
        subs = {"a": b.subscribe("a"), "b": b.subscribe("b"), "ab": b.subscribe("a", "b")}
        if harness.shares_events:  # a subscriber in another process sees the same order
            subs["other a"] = other.subscribe("a")
        sent: dict[int, list[Event]] = {}

        def publish(thread: int) -> None:
            sent[thread] = [b.publish("t", f"{thread}-{n}", channel="ab"[n % 2]) for n in range(50)]

        threads = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(READ_SECONDS)
        everything = [event for events in sent.values() for event in events]
        assert len({event.id for event in everything}) == 200
        got = {name: read(sub, 200 if name == "ab" else 100) for name, sub in subs.items()}
    on_a = [event for event in got["ab"] if int(event.data.strip('"').split("-")[1]) % 2 == 0]
    assert summary(on_a) == summary(got["a"])
    assert sorted(summary(got["ab"])) == sorted(published(everything))
    if harness.shares_events:
        assert summary(got["other a"]) == summary(got["a"])
    for events in sent.values():  # each thread's events come in the order it published them
        mine = {event.data for event in events}
        assert [e.data for e in got["ab"] if e.data in mine] == [e.data for e in events]


def test_ids_are_unique_across_processes_and_forks(harness: Harness) -> None:
    """A broadcaster made before a fork gives each child ids of its own; children work."""
    result = subprocess.run(
        [PYTHON, str(TESTS / "forked.py"), *harness.argv()],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *PYTHONPATH])},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    children = seen["children"]
    assert all("error" not in child for child in children), children
    ids = seen["parent_ids"] + [event_id for child in children for event_id in child["ids"]]
    assert len(ids) == len(set(ids))
    assert [event["data"] for event in seen["parent_got"]] == ['"parent, after the forks"']
    for number, child in enumerate(children):  # each child's subscribers get its events
        assert [event["id"] for event in child["got"]] == child["ids"]
        assert [event["data"] for event in child["got"]] == [
            f'"child-{number} {k}"' for k in range(3)
        ]
    # The second child resumes from the first child's first id: exactly, or with a gap.
    resumed = children[1]["resumed"]
    if harness.shares_events:
        assert [event["id"] for event in resumed] == children[0]["ids"][1:]
    else:
        assert [event["type"] for event in resumed] == [GAP_EVENT_TYPE]


# -- resume ---------------------------------------------------------------------------------


def test_a_client_resumes_exactly_or_begins_with_a_gap(harness: Harness) -> None:
    """An id older than the ring resumes from the store's history, or begins with a gap."""
    with harness.broadcaster(history=2) as b, harness.broadcaster(history=2) as other:
        b.subscribe()  # listening, as a serving process is
        events = [b.publish("t", n, channel="ab"[n % 2]) for n in range(10)]
        servers = [b, other] if harness.shares_events else [b]
        for server in servers:
            with server.subscribe("a", last_event_id=events[1].id) as sub:
                events.append(b.publish("t", "live", channel="a"))
                missed = [event for event in events[2:] if event.channel == "a"]
                got = read(sub, len(missed) if harness.keeps_history else 2)
                if harness.keeps_history:
                    assert summary(got) == published(missed)
                else:
                    assert got[0].type == GAP_EVENT_TYPE
                    assert summary(got[1:]) == published(events[-1:])


@pytest.mark.parametrize("kind", ["unknown", "foreign", "forgotten", "malformed"])
def test_ids_it_cannot_resume_from_give_a_gap(harness: Harness, kind: str) -> None:
    """Never heard of, from another store, trimmed away or garbage: the stream begins with a gap."""
    with harness.broadcaster(history=2, maxlen=1) as b, Broadcaster() as elsewhere:
        probe = Client(b.subscribe(queue_size=1000))
        sent = [b.publish("t", n) for n in range(300)]  # MAXLEN ~ trims in nodes of 100
        probe.until(sent[-1])  # delivered here: the ring holds the last two only
        stale = {
            "unknown": "7-7",
            "foreign": elsewhere.publish("t", 0).id,
            "forgotten": sent[0].id,
            "malformed": "not an id \x7f",
        }[kind]
        with b.subscribe(last_event_id=stale) as sub:
            sent.append(b.publish("t", "live"))
            got = Client(sub).until(sent[-1])
    # The gap carries the newest id this process had delivered (a reconnect resumes from
    # there); what was published after it follows, here or as the store delivers it.
    gap = got[0]
    assert gap.type == GAP_EVENT_TYPE
    after = [event.id for event in sent].index(gap.last_event_id) + 1
    assert summary(got[1:]) == published(sent[after:])


def test_a_reader_that_falls_behind_the_history_gives_its_subscribers_a_gap(
    shared: Harness,
) -> None:
    """A process paused while the store trims what it had yet to read tells its subscribers."""
    with (
        shared.lagging(maxlen=50) as (slow, held_up),
        shared.broadcaster(maxlen=50) as publisher,
    ):
        client = Client(slow.subscribe(queue_size=5000))
        first = publisher.publish("t", 0)
        assert summary(client.events(1)) == published([first])
        with held_up():  # the reader's process is stopped, or its network is
            sent = [publisher.publish("t", n) for n in range(1, 1001)]
        got = client.until(sent[-1])[1:]
        assert client.sub.close_reason is None
    types = [event.type for event in got]
    assert types.count(GAP_EVENT_TYPE) == 1
    hole = types.index(GAP_EVENT_TYPE)
    before, after = got[:hole], got[hole + 1 :]
    # Whatever came on either side of the gap is unbroken: the hole is where the gap is.
    assert summary(before) == published(sent[: len(before)])
    assert summary(after) == published(sent[len(sent) - len(after) :])
    assert len(before) + len(after) < len(sent)


@pytest.mark.parametrize("trimmed", [False, True])
def test_a_client_resuming_on_a_process_that_lags_gets_no_event_twice(
    shared: Harness, trimmed: bool
) -> None:
    """It saw events through a fast process; the one it reconnects to has not read them yet.

    If that process then finds that some were trimmed before it read them, the client may
    be told (a gap), and still gets nothing it saw already.
    """
    maxlen = 50 if trimmed else 10_000
    with (
        shared.lagging(maxlen=maxlen) as (slow, held_up),
        shared.broadcaster(maxlen=maxlen) as fast,
    ):
        slow.subscribe(queue_size=5000)  # a process that serves streams reads the store
        seen_fast = Client(fast.subscribe(queue_size=5000))
        with held_up():  # the slow process's reader is starved for a moment
            sent = [fast.publish("t", n) for n in range(300 if trimmed else 20)]
            seen_fast.until(sent[-1])
            resumed: list[Subscription] = []
            reconnect = threading.Thread(
                target=lambda: resumed.append(slow.subscribe(last_event_id=sent[-1].id))
            )
            reconnect.start()
            time.sleep(0.3)  # it waits for the slow reader (up to 2 s) rather than give a gap
        reconnect.join(READ_SECONDS)
        live = fast.publish("t", "live")
        got = summary(Client(resumed[0]).until(live))
        # The gap comes if the hole was found after the client resumed; either way the
        # client saw every event before its id, and gets none of them again.
        assert got in ([(GAP_EVENT_TYPE, "{}"), *published([live])], published([live]))
        assert resumed[0].read_nowait() == b""  # and nothing else: no duplicate


# -- lifecycle ------------------------------------------------------------------------------


async def test_close_is_idempotent_and_a_new_broadcaster_takes_over(harness: Harness) -> None:
    """close() and aclose() twice are fine; a new broadcaster on the store serves at once."""
    b = harness.broadcaster()
    sub = await b.asubscribe()
    event = await b.apublish("t", 1)
    b.close()
    await b.aclose()
    b.close()
    with pytest.raises(BroadcasterClosedError):
        await b.apublish("t", 2)
    assert [chunk async for chunk in sub] in ([event.frame], [])  # drained, then ended
    async with harness.broadcaster() as restarted:
        resumed = await restarted.asubscribe(last_event_id=event.id)
        later = await restarted.apublish("t", 3)
        got = read(resumed, 1 if harness.keeps_history else 2)
        assert summary(got[-1:]) == published([later])
    assert harness.connections() == 0


async def test_no_call_blocks_the_event_loop_even_when_the_store_never_answers(
    harness: Harness,
) -> None:
    """apublish, asubscribe and aclose leave the loop free, however long the store takes."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:  # how late the loop runs a task that asks for 10 ms
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - started - 0.01)

    ticker = asyncio.create_task(tick())
    if harness.shares_events:
        with harness.silent() as b:
            outcomes = await asyncio.gather(
                b.asubscribe(), b.apublish("t", 1), b.acheck(), return_exceptions=True
            )
            assert all(isinstance(outcome, BackendUnavailableError) for outcome in outcomes)
            await b.aclose()
    else:
        async with harness.broadcaster() as b:
            sub = await b.asubscribe()
            await b.apublish("t", 1)
            await b.acheck()
            assert sub.read_nowait()
    stop.set()
    await ticker
    # A call that blocked the loop would show as a lag of its length: seconds, here.
    assert max(lags) < 1.0


def test_check_passes_while_the_store_answers_and_is_bounded_when_it_does_not(
    harness: Harness,
) -> None:
    """check() passes on a working store; on one that never answers it raises in seconds."""
    with harness.broadcaster() as b:
        b.check()
        assert b.stats().backend_up
    if harness.shares_events:
        with harness.silent() as b:
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                b.check()
            assert time.monotonic() - started < 50  # 10x the longest timeout (5 s)
            assert not b.stats().backend_up


def test_nothing_grows_with_the_event_loops_a_broadcaster_is_used_from(harness: Harness) -> None:
    """Sync code calling async code (asyncio.run each time) leaks no thread, fd or connection."""
    with harness.broadcaster() as b:

        async def request() -> None:
            async with await b.asubscribe() as sub:
                event = await b.apublish("t", "hello")
                async for chunk in sub:
                    if event.frame in chunk:
                        break

        def resources() -> tuple[int, int, int]:
            return threading.active_count(), len(os.listdir("/proc/self/fd")), harness.connections()

        for _ in range(3):
            asyncio.run(request())
        before = resources()
        for _ in range(30):
            asyncio.run(request())
        assert resources() == before
    assert harness.connections() == 0
