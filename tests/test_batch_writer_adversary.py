"""Adversarial tests of the writer `Pump.ready_all` keeps for a wake-up.

`ready_all` takes its writer's bound `send` once (`write = writer.send`) and takes a new
writer, and its `send`, whenever a write leaves the old one unusable: a send that raised
(the writer finished), a send that waited (the writer, stopped in it, is handed to that
stream's task), and a slow-path `_write` that returned False for either reason. A stale
`write` would push the next stream's message into a finished writer (the rest of the
batch degraded to their tasks) or into one stopped in another stream's send (corrupting
that send). These tests build batches that mix the fast path (one frame) and the slow
path (two frames; a feed ended by its lifetime with frames left; a feed revoked) and make
sends misbehave in every place of the batch, one or several, consecutive, and last. Each
client's events must come exactly once, in order, nothing after its end; well-behaved
streams must still be written by the callback; the loop reports no error. The last tests
take a send that, its stream cancelled, awaits again as ssecast abandons it: that is
logged, and costs no other stream anything.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from servers import free_port, running
from ssecast import Broadcaster, CloseReason, Event
from test_batch_adversary import (
    Custom,
    Stream,
    _NextOnlyAwaitable,
    collect_loop_errors,
    finish,
    frames,
    misbehaving,
    started,
)
from test_disconnect_servers_adversary import command, new_channel, until_subscribers
from test_pump_adversary import until

HANG = 5.0
Message = MutableMapping[str, Any]

# Acts a send does on the first body holding an event (after that it passes messages on).
PASSIVE = (
    *("ok", "publish", "thread-publish", "cancel-next", "cancel-prev", "revoke-next"),
    "future-done",
)
WAITING = ("wait", "future", "next-only", "close-wait")
# The task takes the stream over: a StopIteration from a send is a RuntimeError.
FALLBACK = ("exc", "exc-sync", "next-only-raise", "stop-iteration", "stop-iteration-sync")
ENDING = ("os", "cancelled", "base", "generator-exit", "cancel-self", "cancel-self-nowait")
ACTS = (*PASSIVE, *WAITING, *FALLBACK, *ENDING, "close")
PENDINGS = ("one", "two", "expired", "revoked")


class _RaisingNext:
    """An awaitable whose iterator has only `__next__`, which raises."""

    def __await__(self) -> Any:
        return self

    def __next__(self) -> None:
        raise ValueError("a next-only awaitable that fails")


@dataclass
class Scenario:
    """A batch of streams, what each has pending in the first wake-up, and what its send does."""

    pendings: list[str]
    acts: list[str]
    heartbeat: float | None = None
    b: Broadcaster = field(init=False)
    streams: list[Stream] = field(init=False)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    published: list[tuple[str, Event]] = field(default_factory=list)
    where: list[list[bool]] = field(init=False)
    closed: bool = False
    ended_by_others: set[int] = field(default_factory=set)
    loop_errors: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.b = Broadcaster(heartbeat=self.heartbeat, queue_size=10_000)
        self.streams = [
            Stream(
                self.b,
                f"s{n}",
                channels=("c", "d") if pending == "two" else ("c",),
                key=f"k{n}",
            )
            for n, pending in enumerate(self.pendings)
        ]
        self.where = [[] for _ in self.streams]
        for n, stream in enumerate(self.streams):
            stream.send = self._send(n)

    def publish(self, channel: str, data: object) -> None:
        if not self.closed:
            self.published.append((channel, self.b.publish("m", data, channel=channel)))

    def expected(self, n: int) -> bytes:
        channels = ("c", "d") if self.pendings[n] == "two" else ("c",)
        return frames([event for channel, event in self.published if channel in channels])

    def _send(self, n: int) -> Callable[[Message], Awaitable[None]]:
        peer = self.streams[n].peer
        act = self.acts[n]
        fired = False

        def send(message: Message) -> Awaitable[None]:
            nonlocal fired
            body = message.get("body", b"")
            if b"data:" in body:
                self.where[n].append(asyncio.current_task() is None)
            if fired or b"data:" not in body:
                return peer.send(message)
            fired = True
            return self._act(n, act, message)

        return send

    def _task(self, n: int) -> asyncio.Task[None]:
        task = self.streams[n % len(self.streams)].task
        assert task is not None
        return task

    def _act(self, n: int, act: str, message: Message) -> Awaitable[None]:
        peer = self.streams[n].peer
        loop = asyncio.get_running_loop()
        if act == "publish":
            self.publish("c", f"audit-{n}")
        elif act == "thread-publish":

            def publish_three() -> None:
                for k in range(3):
                    self.publish("c", f"t{n}-{k}")

            thread = threading.Thread(target=publish_three)
            thread.start()
            thread.join(HANG)  # the loop is held in the batch while the thread publishes
            assert not thread.is_alive()
        elif act in ("cancel-next", "cancel-prev"):
            other = (n + (1 if act == "cancel-next" else -1)) % len(self.streams)
            if other != n:
                self._task(other).cancel()
                self.ended_by_others.add(other)
        elif act == "revoke-next":
            other = (n + 1) % len(self.streams)
            if other != n:
                self.b.disconnect(key=f"k{other}")
                self.ended_by_others.add(other)
        elif act in ("close", "close-wait"):
            self.closed = True
            self.b.close()
        elif act == "future-done":
            peer.messages.append(message)
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        elif act == "future":
            peer.messages.append(message)
            later: asyncio.Future[None] = loop.create_future()
            loop.call_later(0.005, later.set_result, None)
            return later
        elif act == "next-only":
            peer.messages.append(message)
            return _NextOnlyAwaitable(2)
        elif act == "next-only-raise":
            return _RaisingNext()
        elif act == "exc-sync":
            raise ValueError("a send wrapper that fails before returning an awaitable")
        elif act == "stop-iteration-sync":
            raise StopIteration
        return self._coroutine_act(n, act, message)

    async def _coroutine_act(self, n: int, act: str, message: Message) -> None:
        peer = self.streams[n].peer
        if act in ("wait", "close-wait"):
            await self.gate.wait()
        elif act == "exc":
            raise ValueError("a bug in a middleware")
        elif act == "os":
            raise ConnectionResetError("the client went")
        elif act == "cancelled":
            raise asyncio.CancelledError
        elif act == "base":
            raise Custom
        elif act == "generator-exit":
            raise GeneratorExit
        elif act == "stop-iteration":
            raise StopIteration
        elif act == "cancel-self":
            self._task(n).cancel()
            await asyncio.sleep(1)  # waits: the task, cancelled, closes the write
        elif act == "cancel-self-nowait":
            self._task(n).cancel()
        await peer.send(message)

    # -- running and checking -----------------------------------------------------------

    def ends_itself(self, n: int) -> bool:
        return self.acts[n] in ENDING

    def ended(self, n: int) -> bool:
        return (
            self.closed
            or self.ends_itself(n)
            or n in self.ended_by_others
            or self.pendings[n] in ("expired", "revoked")
        )

    def data(self, n: int) -> bytes:
        return self.streams[n].data.replace(b":\n\n", b"")

    def complete(self) -> bool:
        for n, stream in enumerate(self.streams):
            assert stream.task is not None
            if self.ended(n):
                if not stream.task.done():
                    return False
            elif self.data(n) != self.expected(n):
                return False
        return True

    def end_feed(self, n: int, reason: CloseReason) -> None:
        """End stream n's feed as its lifetime (frames kept) or a revocation (dropped) does."""
        for feed in list(self.b._keyed.get(f"k{n}", ())):
            self.b._release(feed, reason)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        try:
            await started(self.b, self.streams)
            # One wake-up for all: one frame on "c"; a second on "d" for the two-channel
            # streams; the lifetime or a revocation ends some feeds before it runs.
            self.publish("c", 0)
            self.publish("d", "d0")
            for n, pending in enumerate(self.pendings):
                if pending == "expired":
                    self.end_feed(n, CloseReason.EXPIRED)
                elif pending == "revoked":
                    self.end_feed(n, CloseReason.REVOKED)
            await asyncio.sleep(0.03)
            # Fast for the one-channel streams, slow (two frames) for the others.
            self.publish("c", 1)
            self.publish("d", "d1")
            await asyncio.sleep(0.02)
            self.publish("c", 2)  # two in one turn: every stream on the slow path
            self.publish("c", 3)
            await asyncio.sleep(0.02)
            self.gate.set()
            await asyncio.sleep(0.02)
            self.publish("c", 4)
            await until(self.complete, HANG)
            await asyncio.sleep(0.02)
            self.publish("c", 5)  # once more, after the waits ended and the tasks pumped on
            await until(self.complete, HANG)
            await asyncio.sleep(0.03)
            self.check()
        finally:
            await self.finish()
            loop.set_exception_handler(None)
        assert self.loop_errors == [], self.loop_errors

    async def finish(self) -> None:
        await self.b.aclose()
        for stream in self.streams:
            if stream.task is not None:
                stream.task.cancel()
        await asyncio.gather(*(s.task for s in self.streams if s.task), return_exceptions=True)

    def check(self) -> None:
        for n, stream in enumerate(self.streams):
            name = (n, self.pendings[n], self.acts[n])
            data, expected = self.data(n), self.expected(n)
            messages = stream.peer.messages
            ends = [k for k, m in enumerate(messages) if m["type"] == "http.response.body"]
            ends = [k for k in ends if not messages[k].get("more_body", False)]
            assert ends in ([], [len(messages) - 1]), (name, "a write after the end")
            if not self.ended(n):
                assert data == expected, (name, data, expected)
                assert not ends, name
                if self.acts[n] in PASSIVE:
                    assert all(self.where[n]), (name, "written by its task", self.where[n])
                continue
            assert expected.startswith(data), (name, "not a prefix", data, expected)
            # What the first wake-up took for it: "c" 0, and "d" d0 on two channels.
            channels = ("c", "d") if self.pendings[n] == "two" else ("c",)
            first = frames([e for c, e in self.published[:2] if c in channels])
            if self.pendings[n] == "revoked" or self.acts[n] in ENDING[:-1]:
                assert data == b"", (name, data)  # dropped, or its send failed or stopped
            elif self.acts[n] == "cancel-self-nowait" and n not in self.ended_by_others:
                assert data == first, (name, data)  # passed on, then cancelled
            elif self.pendings[n] == "expired" and n not in self.ended_by_others:
                assert data == first, (name, data)  # what it had, then the end


async def _run(pendings: list[str], acts: list[str], heartbeat: float | None = None) -> None:
    await Scenario(pendings, acts, heartbeat).run()


# --- one misbehaving stream, in each place of a batch, on each path -----------------------

_OTHERS = ["one", "two", "one", "two", "one"]


@pytest.mark.parametrize("pending", ["one", "two", "expired"])
@pytest.mark.parametrize("place", [0, 2, 4], ids=["first", "middle", "last"])
@pytest.mark.parametrize("act", ACTS)
async def test_one_misbehaving_send_in_each_place_of_a_mixed_batch(
    act: str, place: int, pending: str
) -> None:
    """Every other stream gets everything once, in order, written by the callback."""
    pendings = list(_OTHERS)
    pendings[place] = pending
    acts = ["ok"] * len(pendings)
    acts[place] = act
    await _run(pendings, acts)


# --- several: consecutive, alternating with well-behaved streams, last -------------------

_HARMFUL = ("wait", "future", "next-only", "exc", "exc-sync", "os", "base", "cancel-self")


@pytest.mark.parametrize("second", _HARMFUL)
@pytest.mark.parametrize("first", _HARMFUL)
async def test_two_misbehaving_sends_back_to_back_and_again_at_the_end(
    first: str, second: str
) -> None:
    """[ok, A (two frames), B, ok (two frames), A, B (last)]: the writer is replaced each time."""
    pendings = ["one", "two", "one", "two", "one", "two"]
    acts = ["ok", first, second, "ok", first, second]
    await _run(pendings, acts)


@pytest.mark.parametrize("act", ["wait", "exc", "future", "next-only", "cancel-prev"])
async def test_every_stream_of_the_batch_misbehaves_alike(act: str) -> None:
    """No stream leaves the writer usable for the next one."""
    await _run(["one", "two"] * 3, [act] * 6)


@pytest.mark.parametrize("act", ["wait", "future", "next-only"])
async def test_a_stream_cancels_the_one_before_it_while_that_one_waits(act: str) -> None:
    """s1 waits (its writer handed to its task); s2 cancels s1, which closes that writer.

    s3 and s4, written after, must be written with a fresh writer, not s1's closed one.
    """
    await _run(["one", "one", "two", "one", "one"], ["ok", act, "cancel-prev", "ok", "ok"])


@pytest.mark.parametrize("seed", range(40))
async def test_random_batches(seed: int) -> None:
    """Random mixes of paths and acts over 7 streams, with heartbeats on some."""
    rng = random.Random(seed)
    size = 7
    pendings = [rng.choice(PENDINGS) for _ in range(size)]
    acts = [rng.choice(("ok", "ok", *ACTS)) for _ in range(size)]
    if sum(a.startswith("close") for a in acts) > 1:
        acts = [a if not a.startswith("close") else "ok" for a in acts]
        acts[rng.randrange(size)] = "close"
    await _run(pendings, acts, heartbeat=0.01 if seed % 3 == 0 else None)


# --- publishers in other threads throughout -----------------------------------------------


async def test_thread_publishers_during_batches_with_misbehaving_sends() -> None:
    """Two threads publish while batches with waiting and failing sends are written."""
    b = Broadcaster(heartbeat=None, queue_size=100_000)
    gate = asyncio.Event()
    streams = [Stream(b, f"s{n}", channels=("c", "d") if n % 2 else ("c",)) for n in range(6)]
    where: list[list[bool]] = [[] for _ in streams]
    count = [0] * len(streams)

    def wrap(n: int) -> Callable[[Message], Awaitable[None]]:
        peer = streams[n].peer

        async def send(message: Message) -> None:
            if b"data:" in message.get("body", b""):
                where[n].append(asyncio.current_task() is None)
                count[n] += 1
                if n == 1 and count[n] % 5 == 0:
                    await gate.wait()  # waits now and then, on two channels
                if n == 3 and count[n] == 3:
                    raise ValueError("needs its task")
                if n == 4 and count[n] % 4 == 0:
                    await asyncio.sleep(0)
            await peer.send(message)

        return send

    for n, stream in enumerate(streams):
        stream.send = wrap(n)
    await started(b, streams)
    per = 300

    def publish(p: int) -> None:
        for k in range(per):
            b.publish("m", {"p": p, "n": k}, channel="c" if (k + p) % 3 else "d")

    async def open_gate() -> None:
        for _ in range(200):
            gate.set()
            await asyncio.sleep(0.002)
            gate.clear()
            await asyncio.sleep(0.002)
        gate.set()

    try:
        opener = asyncio.create_task(open_gate())
        await asyncio.wait_for(
            asyncio.gather(*(asyncio.to_thread(publish, p) for p in range(2))), HANG
        )
        await opener
        for n, stream in enumerate(streams):
            want = 2 * per if n % 2 else sum(1 for p in range(2) for k in range(per) if (k + p) % 3)
            await until(lambda s=stream, w=want: s.data.count(b"data:") >= w)  # type: ignore[misc]
        await asyncio.sleep(0.03)
        for n, stream in enumerate(streams):
            lines = [x for x in stream.data.split(b"\n") if x.startswith(b"data:")]
            for p in range(2):
                got = [
                    int(x.split(b'"n":')[1].rstrip(b"}"))
                    for x in lines
                    if f'"p":{p},'.encode() in x
                ]
                want_p = [k for k in range(per) if n % 2 or (k + p) % 3]
                assert got == want_p, (n, p)
        for n in (0, 2, 5):
            assert all(where[n]), (n, where[n].count(False))
    finally:
        await finish(b, streams)


# --- a real server: uvicorn with a middleware that waits for one client, raises for another --


async def _read_events(client: httpx.AsyncClient, url: str, want: int, out: list[str]) -> None:
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                out.append(line[4:])
                if len(out) >= want:
                    return


async def test_uvicorn_middleware_waiting_for_one_client_and_raising_for_another() -> None:
    """Eight httpx clients on uvicorn; the middleware waits mid-batch for one, raises for one."""
    port = free_port()
    argv = command("uvicorn-h11", "WAIT_AND_RAISE", port, "batch_adversary_app")
    with running(argv, port=port, env={"SSECAST_TEST_HEARTBEAT": "0.05"}) as process:
        channel = new_channel()
        clients = 8
        rounds = 6
        got: list[list[str]] = [[] for _ in range(clients)]
        async with (
            httpx.AsyncClient(base_url=process.url, timeout=HANG) as http,
            httpx.AsyncClient(
                base_url=process.url,
                timeout=HANG,
                limits=httpx.Limits(max_connections=clients + 2),
            ) as readers,
        ):
            who = ["ok", "wait", "raise", "ok", "wait", "yield", "ok", "raise"]
            tasks = [
                asyncio.create_task(
                    _read_events(
                        readers,
                        f"/events/?channel={channel}&who={who[n]}",
                        rounds * 3,
                        got[n],
                    )
                )
                for n in range(clients)
            ]
            try:
                assert await until_subscribers(http, clients, HANG)
                published: list[str] = []
                for round_ in range(rounds):
                    response = await http.post(
                        "/control/publish", params={"channel": channel, "count": 1 + round_ % 3}
                    )
                    response.raise_for_status()
                    published += response.json()
                    await asyncio.sleep(0.03)
                extra = await http.post(
                    "/control/publish", params={"channel": channel, "count": rounds * 3 - 12}
                )
                extra.raise_for_status()
                published += extra.json()
                await asyncio.wait_for(asyncio.gather(*tasks), HANG)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    assert len(published) == rounds * 3
    for n in range(clients):
        assert got[n] == published, (n, who[n], got[n], published)
    log = process.log()
    assert "Traceback" not in log, log
    assert "never awaited" not in log, log
    assert "never retrieved" not in log, log


# --- a write the pump closes from a callback, whose send awaits in a `finally` ------------------


def _cancels_itself_then_cleans_up(streams: list[Stream], n: int) -> Callable[[], Awaitable[None]]:
    """A send's act: cancel its own task, wait, and on the way out await a clean-up.

    The pump then abandons the write from the callback (`_Waiting.close`), which throws
    `GeneratorExit` into the send; its `finally` awaits, so closing it raises
    `RuntimeError("coroutine ignored GeneratorExit")` (a task would throw `CancelledError`
    instead, and the clean-up would run).
    """

    async def act() -> None:
        task = streams[n].task
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(1)
        finally:
            await asyncio.sleep(0)  # a clean-up that awaits: flushing a log, say

    return act


def _abandoned_send_logged(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether ssecast logged, with its traceback, the send that would not stop."""
    return any(
        record.name == "ssecast"
        and record.levelname == "ERROR"
        and record.exc_info is not None
        and "ignored GeneratorExit" in str(record.exc_info[1])
        for record in caplog.records
    )


async def test_a_send_that_awaits_while_closed_mid_batch_costs_the_others_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """s1 cancels its own task, waits, and awaits again in a `finally` when closed.

    Closing that write fails; it is logged, and the streams after it lose nothing.
    """
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(4)]
    streams[1].send = misbehaving(streams[1].peer, _cancels_itself_then_cleans_up(streams, 1))
    errors = collect_loop_errors()
    await started(b, streams)
    events = [b.publish("m", 0, channel="c")]
    try:
        await asyncio.sleep(0.05)
        events.append(b.publish("m", 1, channel="c"))
        # The send misbehaved: it is logged, but no other stream pays.
        for n in (0, 2, 3):
            await until(lambda n=n: streams[n].data == frames(events))  # type: ignore[misc]
        assert errors == []
        assert _abandoned_send_logged(caplog)
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        await finish(b, streams)


async def test_a_send_that_awaits_while_closed_on_a_heartbeat_stops_no_other_heartbeat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """s1's send, given a heartbeat, cancels its task and awaits in a `finally` when closed.

    Closing that write fails; it is logged, and the clock goes on beating for the others.
    """
    b = Broadcaster(heartbeat=0.02)
    streams = [Stream(b, f"s{n}") for n in range(3)]
    act = _cancels_itself_then_cleans_up(streams, 1)
    fired = False
    armed = False  # from once every stream started

    async def send(message: Message) -> None:
        nonlocal fired
        if armed and not fired and message.get("body") == b":\n\n":
            fired = True
            await act()
        await streams[1].peer.send(message)

    streams[1].send = send
    errors = collect_loop_errors()
    await started(b, streams)
    armed = True
    try:
        await until(lambda: fired, HANG)
        marks = [len(streams[n].peer.bodies) for n in (0, 2)]

        def beats() -> int:
            return min(len(streams[n].peer.bodies) - marks[k] for k, n in enumerate((0, 2)))

        await until(lambda: beats() >= 3, HANG)  # 0.06 s of heartbeats; none once stopped
        assert errors == []
        assert _abandoned_send_logged(caplog)
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        await finish(b, streams)


async def test_a_send_that_awaits_while_closed_by_its_cancelled_task_ends_it_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The task, cancelled once its send waited, abandons the write; the close fails.

    The stream still ends as a cancelled one does (its response ended, no error out of the
    app), the failure is logged, and the other streams lose nothing.
    """
    b = Broadcaster(heartbeat=None)
    streams = [Stream(b, f"s{n}") for n in range(3)]
    never = asyncio.Event()

    async def cancel_once_waiting_then_clean_up() -> None:
        task = streams[1].task
        assert task is not None
        # Runs after the wake-up handed this waiting write to the task, before the task does.
        asyncio.get_running_loop().call_soon(task.cancel)
        try:
            await never.wait()
        finally:
            await asyncio.sleep(0)  # a clean-up that awaits

    streams[1].send = misbehaving(streams[1].peer, cancel_once_waiting_then_clean_up)
    await started(b, streams)
    events = [b.publish("m", 0, channel="c")]
    try:
        task = streams[1].task
        assert task is not None
        await asyncio.wait({task}, timeout=HANG)
        assert task.done()
        assert task.exception() is None
        assert streams[1].peer.ended
        assert _abandoned_send_logged(caplog)
        events.append(b.publish("m", 1, channel="c"))
        for n in (0, 2):
            await until(lambda n=n: streams[n].data == frames(events))  # type: ignore[misc]
    finally:
        await finish(b, streams)
