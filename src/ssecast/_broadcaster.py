"""The Broadcaster: validate, encode once, fan out under the lock, evict the slow.

Every lock ssecast makes, what it guards, and the order they are taken in: a thread that
holds one takes only locks of a higher order, never a leaf's. None is held while code that
is not ssecast's runs (a serializer, a logging handler, backend I/O, an ASGI `send`, a
user's callback) or while anything blocks; evictions found while a backend holds its lock
are logged once the publishing call has released every lock.

```text
=====  ======================================  ======================================
order  lock (module)                           guards
=====  ======================================  ======================================
1      _registry_lock (_fork)                  the locks held across os.fork();
                                               the fork hooks then take 2 to 4
2      MemoryBackend._lock (_backend)          its id counter; held across
                                               deliver so ids arrive in order
3      Broadcaster._lock (here)                audiences, every feed (frames, waiter,
                                               end), history, counters, flags
4      RedisBackend._lock (redis)              a leaf: its callbacks, reader, closed
4      Connections._lock (_redis_connections)  a leaf: closed or not, and the
                                               commands running on the shared client
4      PostgresBackend._lock (postgres)        a leaf: its callbacks, listener, closed
4      Connections._lock                       a leaf: closed or not, the idle
       (_postgres_connections)                 connections and how many are lent
4      Availability._lock (_availability)      a leaf: a backend's store reachable or
                                               not, as its last call found it
=====  ======================================  ======================================
```
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import NamedTuple, Self, cast

from ssecast import _control, _fork, _wire
from ssecast._backend import Ahead, Backend, MemoryBackend
from ssecast._encoder import GAP_EVENT_TYPE, Encoder, Payload, Serializer
from ssecast._event import Draft, Event, check_channel, check_field
from ssecast._exceptions import (
    REFUSED_FOR_NOW,
    BackendUnavailableError,
    BroadcasterClosedError,
    ConfigurationError,
    InvalidFieldError,
    PublishError,
    TooManySubscribersError,
)
from ssecast._history import History
from ssecast._subscription import Audience, CloseReason, Feed, Subscription, Waiter, wake

__all__ = ["DEFAULT_CHANNEL", "Broadcaster", "Stats", "check_lifetime"]

logger = logging.getLogger("ssecast")

DEFAULT_CHANNEL = "default"
"""The channel `publish` and `subscribe` use when given none."""
_DEFAULT_CHANNELS = frozenset((DEFAULT_CHANNEL,))
# A resume asks the backend again when more events were delivered while it read than the
# ring holds (a reader catching up); after this many reads, the client gets a gap.
_REPLAY_TRIES = 3

# While a publish call runs its backend's publish, the evictions its delivery causes,
# logged once that returns: the backend may hold its lock meanwhile, and a logging
# handler that publishes (a live log viewer) would wait for it in another thread.
_evicted_here: contextvars.ContextVar[list[Feed] | None] = contextvars.ContextVar(
    "ssecast_evicted_here", default=None
)


class Stats(NamedTuple):
    """A broadcaster's counters, read at once by [`stats`][ssecast.Broadcaster.stats]."""

    subscribers: int
    """Subscriptions open now."""
    published: int
    """Events this process accepted in `publish` or `apublish`."""
    delivered: int
    """Event frames handed to subscribers: one per event per subscriber."""
    evicted: int
    """Subscriptions ended because they fell more than `queue_size` behind."""
    rejected: int
    """Publishes refused by validation."""
    revoked: int
    """Subscriptions this process ended for `Broadcaster.disconnect`, called in any process."""
    expired: int
    """Subscriptions ended because their `lifetime` ran out."""
    refused: int
    """`subscribe` calls refused for a while: they raised
    [`TooManySubscribersError`][ssecast.TooManySubscribersError],
    [`BroadcasterClosedError`][ssecast.BroadcasterClosedError] or
    [`BackendUnavailableError`][ssecast.BackendUnavailableError], which the adapters answer
    so that the client comes back later. Those answers are not errors on the wire (an
    `EventSource` gets a `200` that tells it to retry), so this counter is where they show."""
    backend_up: bool = True
    """Whether the backend's store answered its last call (always, for the memory backend)."""


class Broadcaster:
    """Broadcast events from any thread or event loop to many SSE subscribers.

    `publish` validates an event, serializes and encodes it once, and appends the
    same immutable bytes to every subscriber of its channel. A subscriber that falls
    more than `queue_size` frames behind is evicted rather than buffered without bound,
    so memory stays under `max_subscribers x queue_size x max_payload_bytes`.

    It may be made at import time, before a server forks its workers: each worker then
    hands out ids of its own and serves only its own subscribers.

    :param event_types: the event types `publish` accepts; `None` accepts any valid one.
    :param max_payload_bytes: the largest serialized data, in UTF-8 bytes.
    :param queue_size: frames a subscriber may have pending; one more evicts it.
    :param history: recent events kept for `Last-Event-ID` resume; 0 keeps none.
    :param heartbeat: seconds of silence before a subscription yields a keep-alive
        comment (read on an event loop, up to a quarter more); `None` sends none.
    :param retry: milliseconds a client should wait before reconnecting; when set,
        every stream begins with a `retry:` field.
    :param max_subscribers: the most subscriptions open at once; `None` is no limit.
    :param max_subscribers_per_key: the most subscriptions open at once with the same
        `key` (see [`subscribe`][ssecast.Broadcaster.subscribe]); `None` is no limit.
    :param serializer: turns data into `str` or UTF-8 `bytes`; the default is
        compact `json.dumps` that refuses NaN and infinities.
    :param backend: assigns ids, keeps history and carries events between processes; the
        default is a [`MemoryBackend`][ssecast.MemoryBackend]. One backend serves one
        broadcaster.
    :raises ConfigurationError: an argument is out of range.
    """

    def __init__(
        self,
        *,
        event_types: Iterable[str] | None = None,
        max_payload_bytes: int = 65536,
        queue_size: int = 256,
        history: int = 1024,
        heartbeat: float | None = 15.0,
        retry: int | None = None,
        max_subscribers: int | None = None,
        max_subscribers_per_key: int | None = None,
        serializer: Serializer | None = None,
        backend: Backend | None = None,
    ) -> None:
        max_payload_bytes = _at_least(1, "max_payload_bytes", max_payload_bytes)
        self._queue_size = _at_least(1, "queue_size", queue_size)
        self._history = History(_at_least(0, "history", history))
        self._heartbeat = None if heartbeat is None else _seconds("heartbeat", heartbeat)
        self._prelude = [] if retry is None else [_wire.retry(_at_least(0, "retry", retry))]
        self._max_subscribers = (
            None if max_subscribers is None else _at_least(1, "max_subscribers", max_subscribers)
        )
        self._max_per_key = (
            None
            if max_subscribers_per_key is None
            else _at_least(1, "max_subscribers_per_key", max_subscribers_per_key)
        )
        self._encoder = Encoder(event_types, max_payload_bytes, serializer)
        # Made before the lock is guarded: the fork hooks take locks in the order they
        # were guarded, and a backend's comes before its broadcaster's.
        self._backend: Backend = MemoryBackend() if backend is None else backend

        # See the table at the top of this module. Guards everything below, and every
        # feed's state.
        self._lock = threading.Lock()
        self._closed = False
        self._listening = False
        self._listen_attempt: _Attempt | None = None
        self._audiences: dict[str, Audience] = {}
        # Feeds resumed from an id that another process delivered and this one has not yet,
        # by that id: held out of the fan-out until it, or an event after it, comes, so
        # that their client gets no event twice. With the backend's word on "after".
        self._held: dict[str, tuple[Ahead, list[Feed]]] = {}
        # The open feeds of each key, for the per-key limit and for disconnect().
        self._keyed: dict[str, set[Feed]] = {}
        # Subscriptions waiting for the backend's history, which disconnect() marks.
        self._in_flight: set[_Flight] = set()
        # Tells this broadcaster's disconnect orders from other processes' (see _control).
        self._origin = secrets.token_hex(8)
        self._subscriber_count = 0
        self._published = 0
        self._delivered = 0
        self._evicted = 0
        self._rejected = 0
        self._revoked = 0
        self._expired = 0
        self._refused = 0
        # One bound method for every subscription to call, rather than one made for each.
        self._releaser = self._release
        self._backend.start(self._deliver, self._report_gap)
        _fork.guard(self, self._lock, Broadcaster._in_child)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._subscriber_count} subscribers"
        return f"<Broadcaster {type(self._backend).__name__} {state}>"

    # -- publishing ------------------------------------------------------------------

    def publish(
        self, event_type: str, data: Payload, *, channel: str = DEFAULT_CHANNEL, raw: bool = False
    ) -> Event:
        """Send an event to every subscriber of `channel`; return it, with its id.

        Never blocks on a subscriber; safe from any thread and inside an event loop
        (with the in-memory backend it does no I/O at all).

        :param event_type: the SSE event type, matched by `addEventListener`.
        :param data: any value the serializer takes; with `raw=True`, a `str` sent as is.
        :param channel: which subscribers get it.
        :param raw: send `data` (a `str`, such as an HTML fragment) without serializing.
        :raises PublishError: the event is invalid (see its subclasses); nothing was sent.
        :raises BroadcasterClosedError: the broadcaster was closed.
        :raises BackendUnavailableError: the backend could not be reached; nothing was sent.
        """
        draft = self._draft(event_type, data, channel, raw)
        deferring = _evicted_here.set([])
        try:
            event = self._backend.publish(draft)
        finally:
            _log_deferred_evictions(deferring)
        with self._lock:
            self._published += 1
        return event

    async def apublish(
        self, event_type: str, data: Payload, *, channel: str = DEFAULT_CHANNEL, raw: bool = False
    ) -> Event:
        """Do what [`publish`][ssecast.Broadcaster.publish] does, from a coroutine.

        A backend's I/O does not block the running loop.
        """
        draft = self._draft(event_type, data, channel, raw)
        deferring = _evicted_here.set([])
        try:
            event = await self._backend.apublish(draft)
        finally:
            _log_deferred_evictions(deferring)
        with self._lock:
            self._published += 1
        return event

    def _draft(self, event_type: str, data: Payload, channel: str, raw: bool) -> Draft:
        """Validate and encode an event: everything `publish` does before the backend."""
        if self._closed:
            raise BroadcasterClosedError("the broadcaster is closed; create a new one to publish")
        try:
            return self._encoder.draft(event_type, data, channel, raw)
        except PublishError as error:
            self._reject(error)
            raise

    def _reject(self, error: PublishError) -> None:
        with self._lock:
            self._rejected += 1
        # The caller gets the exception; this is for operators, so it must not be noisy.
        logger.info("publish rejected: %s", error)

    # -- delivery: what the backend calls ----------------------------------------------

    def _deliver(self, event: Event) -> None:
        """Append one event's frame to its channel's subscribers.

        :raises BroadcasterClosedError: it was closed (even while `publish` was running).
        """
        if event.channel == _CONTROL_CHANNEL:
            self._obey(event)
            return
        woken: list[Waiter | None] = []
        evicted: list[Feed] = []
        with self._lock:
            if self._closed:
                raise BroadcasterClosedError("the broadcaster was closed; the event was not sent")
            self._history.append(event)
            if self._held:
                self._join_before(event.id)
            audience = self._audiences.get(event.channel)
            if audience is not None:
                audience.deliver(event.frame, woken, evicted)
                self._delivered += len(audience) - len(evicted)
                self._evict(evicted, woken)
            if self._held:
                self._join_after(event.id)
        wake(woken)
        if evicted:
            _report_evictions(evicted)

    def _report_gap(self) -> None:
        """Give every subscriber a gap event, and forget the history before it.

        :raises BroadcasterClosedError: it was closed.
        """
        woken: list[Waiter | None] = []
        evicted: list[Feed] = []
        with self._lock:
            if self._closed:
                raise BroadcasterClosedError("the broadcaster was closed")
            self._history.forget()
            for feed in self._feeds():
                if feed.push(_GAP_BODY, woken):
                    evicted.append(feed)
            self._evict(evicted, woken)
        wake(woken)
        if evicted:
            _report_evictions(evicted)

    def _evict(self, evicted: list[Feed], woken: list[Waiter | None]) -> None:
        # Precondition: self._lock is held.
        for feed in evicted:
            self._forget(feed)
            woken.append(feed.end(CloseReason.EVICTED))
        self._evicted += len(evicted)

    def _join_before(self, event_id: str) -> None:
        """Let in the held feeds whose awaited event was lost: `event_id` comes after it."""
        # Precondition: self._lock is held.
        passed = [
            awaited
            for awaited, (ahead, _) in self._held.items()
            if awaited != event_id and ahead.follows(event_id)
        ]
        for awaited in passed:
            for feed in self._held.pop(awaited)[1]:
                self._join(feed)

    def _join_after(self, event_id: str) -> None:
        """Let the feeds that waited for `event_id` in: the next event is theirs."""
        # Precondition: self._lock is held.
        if event_id in self._held:
            for feed in self._held.pop(event_id)[1]:
                self._join(feed)

    # -- subscribing -----------------------------------------------------------------

    def subscribe(
        self,
        *channels: str,
        last_event_id: str | None = None,
        queue_size: int | None = None,
        key: str | None = None,
        lifetime: float | None = None,
    ) -> Subscription:
        """Open a subscription to `channels` (`"default"` if none); it is live on return.

        With `last_event_id`, the subscription first replays every event on its
        channels published after that id, then goes on live with no gap and no
        duplicate. When those events are no longer known, it begins with an
        `ssecast.gap` event instead, so the client can reload its state.

        The first subscription starts the backend's listening, and resuming from an id
        older than the `history` ring asks the backend; either may do I/O (Redis), so from
        a coroutine use [`asubscribe`][ssecast.Broadcaster.asubscribe], which does that
        off the loop.

        :param channels: the channels to receive.
        :param last_event_id: the id of the last event the client saw (the
            `Last-Event-ID` header); `None` or `""` starts live.
        :param queue_size: this subscriber's limit of pending frames, instead of the
            broadcaster's.
        :param key: tags the subscription, with a user id say, for
            [`disconnect`][ssecast.Broadcaster.disconnect] and `max_subscribers_per_key`.
        :param lifetime: seconds after which the subscription ends
            ([`CloseReason.EXPIRED`][ssecast.CloseReason], after its pending frames), less
            up to 10% at random, so that streams opened together do not all end together;
            never later, so a lifetime that is a token's validity is honoured.
        :raises InvalidFieldError: a channel name or the key is invalid (a channel name
            may not begin with `ssecast.`).
        :raises ConfigurationError: `queue_size` or `lifetime` is out of range.
        :raises TooManySubscribersError: `max_subscribers` are open already, or
            `max_subscribers_per_key` with this key (then its `key` attribute is set).
        :raises BroadcasterClosedError: the broadcaster was closed.
        :raises BackendUnavailableError: the backend is unreachable.
        """
        request = self._request(channels, last_event_id, queue_size, key, lifetime)
        with self._counting_refusals():
            self._listen()
            begun = self._begin(request)
            tries = _REPLAY_TRIES
            try:
                while isinstance(begun, _Resume):
                    tries -= 1
                    older = self._backend.replay(begun.last_event_id, begun.newest, begun.channels)
                    begun = self._finish(begun, older, last_try=tries == 0)
            finally:
                if isinstance(begun, _Resume):  # the backend or a limit refused it
                    self._abandon(begun)
            return begun

    async def asubscribe(
        self,
        *channels: str,
        last_event_id: str | None = None,
        queue_size: int | None = None,
        key: str | None = None,
        lifetime: float | None = None,
    ) -> Subscription:
        """Do what [`subscribe`][ssecast.Broadcaster.subscribe] does, from a coroutine.

        A backend's I/O does not block the running loop.
        """
        request = self._request(channels, last_event_id, queue_size, key, lifetime)
        with self._counting_refusals():
            if not self._listening:
                await asyncio.to_thread(self._listen)
            begun = self._begin(request)
            tries = _REPLAY_TRIES
            try:
                while isinstance(begun, _Resume):
                    tries -= 1
                    older: list[Event] | Ahead | None = None
                    # A MemoryBackend keeps no history of its own: no call, and no thread,
                    # for a stale id. (A subclass may keep some, so it is asked as others.)
                    if type(self._backend) is not MemoryBackend:
                        older = await asyncio.to_thread(
                            self._backend.replay, begun.last_event_id, begun.newest, begun.channels
                        )
                    begun = self._finish(begun, older, last_try=tries == 0)
            finally:
                if isinstance(begun, _Resume):  # the backend or a limit refused it
                    self._abandon(begun)
            return begun

    @contextlib.contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        """Count a subscribe call that raised a refusal for a while, as `stats().refused`."""
        try:
            yield
        except REFUSED_FOR_NOW:
            with self._lock:
                self._refused += 1
            raise

    def _request(
        self,
        channels: tuple[str, ...],
        last_event_id: str | None,
        queue_size: int | None,
        key: str | None,
        lifetime: float | None,
    ) -> _Request:
        """Check a subscribe call's arguments, before anything is done for it."""
        names = frozenset(check_channel(name) for name in channels) or _DEFAULT_CHANNELS
        capacity = (
            self._queue_size if queue_size is None else _at_least(1, "queue_size", queue_size)
        )
        if last_event_id is not None and not isinstance(last_event_id, str):
            raise InvalidFieldError("last event id", last_event_id, "expected a str or None")
        return _Request(
            names,
            capacity,
            last_event_id or None,
            None if key is None else check_field("key", key),
            None if lifetime is None else check_lifetime(lifetime),
        )

    def _listen(self) -> None:
        """Have the backend deliver every process's events, before the first subscription.

        The backend's `listen` runs with no lock held. Callers that come while it runs
        wait for it, and share its failure rather than each trying again in turn.
        """
        while not self._listening:
            with self._lock:
                if self._closed:
                    raise BroadcasterClosedError(
                        "the broadcaster is closed; it takes no subscribers"
                    )
                attempt = self._listen_attempt
                leading = attempt is None
                if attempt is None:
                    attempt = self._listen_attempt = _Attempt()
            if not leading:
                attempt.join()
                continue
            try:
                self._backend.listen()
            except BaseException as error:
                with self._lock:
                    self._listen_attempt = None
                    closed = self._closed
                attempt.end(error)
                if closed:  # close() stopped the backend as it connected
                    raise BroadcasterClosedError("the broadcaster was closed") from error
                raise
            with self._lock:
                self._listening = True
                self._listen_attempt = None
            attempt.end(None)

    def _begin(self, request: _Request) -> Subscription | _Resume:
        """Subscribe from the ring of recent events, or say what to ask the backend."""
        with self._lock:
            self._check_room(request)
            if request.last_event_id is None:
                return self._register(request, self._prelude.copy())
            replayed = self._history.after(request.last_event_id, request.channels)
            if replayed is not None:
                return self._register(request, _joined(self._prelude, replayed))
            flight = _Flight(request)
            self._in_flight.add(flight)
            return _Resume(flight, self._history.mark, self._history.last_id)

    def _finish(
        self, resume: _Resume, older: list[Event] | Ahead | None, *, last_try: bool
    ) -> Subscription | _Resume:
        """Subscribe with what the backend replayed; the ring fills in what came since.

        When more came since than the ring holds, and this is not the `last_try`, return
        what to ask the backend again, up to the newest event delivered now.
        """
        request = resume.request
        with self._lock:
            self._check_room(request)
            recent = None
            if isinstance(older, list):
                recent = self._history.since(resume.mark, request.channels)
                if recent is None and not last_try:
                    return resume._replace(mark=self._history.mark, newest=self._history.last_id)
            self._in_flight.discard(resume.flight)
            if resume.flight.revoked:
                return self._revoked_meanwhile(request)
            if older is None or isinstance(older, Ahead):
                # Unknown to the backend, or delivered by another process first: this one
                # may have delivered it by now.
                replayed = self._history.after(resume.last_event_id, request.channels)
                if replayed is None and isinstance(older, Ahead):
                    return self._hold(request, resume.last_event_id, older)
            else:
                replayed = None if recent is None else older + recent
            if replayed is None:
                head = [*self._prelude, _gap(self._history.last_id)]
            else:
                head = _joined(self._prelude, replayed)
            return self._register(request, head)

    def _revoked_meanwhile(self, request: _Request) -> Subscription:
        """Return the subscription a disconnect matched while the backend read, ended."""
        # Precondition: self._lock is held. Authorized before the disconnect, it ends as
        # if it had been registered then; never counted in, it has nothing to forget.
        feed = Feed(
            channels=request.channels,
            capacity=request.capacity,
            heartbeat=None,
            head=[],
            lock=self._lock,
            key=request.key,
        )
        feed.end(CloseReason.REVOKED)
        self._revoked += 1
        return Subscription(feed, self._releaser)

    def _abandon(self, resume: _Resume) -> None:
        """Forget a resume that the backend or a limit refused."""
        with self._lock:
            self._in_flight.discard(resume.flight)

    def _check_room(self, request: _Request) -> None:
        # Precondition: self._lock is held. Checked and counted in one hold of the lock
        # with the registration that follows, so no burst of subscribers gets past a limit.
        if self._closed:
            raise BroadcasterClosedError("the broadcaster is closed; it takes no subscribers")
        if self._max_subscribers is not None and self._subscriber_count >= self._max_subscribers:
            raise TooManySubscribersError(self._max_subscribers)
        key = request.key
        limit = self._max_per_key
        if key is not None and limit is not None and len(self._keyed.get(key, ())) >= limit:
            raise TooManySubscribersError(limit, key)

    def _register(self, request: _Request, head: list[bytes]) -> Subscription:
        # Precondition: self._lock is held.
        feed = self._feed(request, head)
        self._join(feed)
        return Subscription(feed, self._releaser)

    def _hold(self, request: _Request, awaited: str, ahead: Ahead) -> Subscription:
        """Subscribe, but deliver only what comes after `awaited` is delivered here."""
        # Precondition: self._lock is held.
        feed = self._feed(request, self._prelude.copy())
        feed.held_for = awaited
        self._held.setdefault(awaited, (ahead, []))[1].append(feed)
        return Subscription(feed, self._releaser)

    def _feed(self, request: _Request, head: list[bytes]) -> Feed:
        """Make a feed for `request`, and count it in."""
        # Precondition: self._lock is held.
        lifetime = request.lifetime
        feed = Feed(
            channels=request.channels,
            capacity=request.capacity,
            heartbeat=self._heartbeat,
            head=head,
            lock=self._lock,
            key=request.key,
            expires=None
            if lifetime is None
            else time.monotonic() + lifetime * (1 - random.random() / 10),
        )
        if feed.key is not None:
            self._keyed.setdefault(feed.key, set()).add(feed)
        self._subscriber_count += 1
        return feed

    def _join(self, feed: Feed) -> None:
        # Precondition: self._lock is held.
        feed.held_for = None
        audiences = tuple(self._audience(name) for name in feed.channels)
        if len(audiences) == 1:  # one set and one tuple per channel, not per subscriber
            feed.channels, audiences = audiences[0].channels, audiences[0].alone
        feed.join(audiences)

    def _release(self, feed: Feed, reason: CloseReason) -> None:
        """Close `feed` for its consumer, or its lifetime: forget it and wake its reader."""
        with self._lock:
            if reason is CloseReason.EXPIRED and not feed.closed:
                self._expired += 1
            self._forget(feed)
            waiter = feed.end(reason)
        wake((waiter,))

    def _forget(self, feed: Feed) -> None:
        """Remove `feed` from every channel it is registered on, if it still is."""
        # Precondition: self._lock is held.
        if feed.closed:
            return  # already forgotten when it ended
        if feed.held_for is not None:
            _, held = self._held[feed.held_for]
            held.remove(feed)
            if not held:
                del self._held[feed.held_for]
        else:
            for name in feed.channels:
                audience = self._audiences[name]
                audience.remove(feed)
                if not audience:
                    del self._audiences[name]
        if feed.key is not None:
            keyed = self._keyed[feed.key]
            keyed.remove(feed)
            if not keyed:
                del self._keyed[feed.key]
        self._subscriber_count -= 1

    def _audience(self, channel: str) -> Audience:
        # Precondition: self._lock is held.
        audience = self._audiences.get(channel)
        if audience is None:
            audience = self._audiences[channel] = Audience(channel)
        return audience

    def _feeds(self) -> set[Feed]:
        # Precondition: self._lock is held.
        feeds = {feed for audience in self._audiences.values() for feed in audience.feeds}
        return feeds.union(*(held for _, held in self._held.values()))

    def _end_all(self) -> list[Waiter | None]:
        """End every feed for a shutdown; return the waiters to wake."""
        # Precondition: self._lock is held.
        feeds = self._feeds()
        self._audiences.clear()
        self._held.clear()
        self._keyed.clear()
        self._subscriber_count = 0
        return [feed.end(CloseReason.SHUTDOWN) for feed in feeds]

    # -- revoking --------------------------------------------------------------------

    def disconnect(self, *, channel: str | None = None, key: str | None = None) -> int:
        """End every subscription of `channel`, or with `key`, or both; in every process.

        Each ends at once, its pending frames dropped, with
        [`CloseReason.REVOKED`][ssecast.CloseReason]: its client's stream ends, and its
        reconnection is checked again like any new request. With a shared backend, an
        order goes through it to every other process, which ends its own matching
        subscriptions when it arrives; no client ever receives it as an event. Subscribing
        again from then on is not refused: refuse it where the request is authorized.

        :param channel: end the subscriptions that receive this channel.
        :param key: end the subscriptions with this key (see
            [`subscribe`][ssecast.Broadcaster.subscribe]).
        :returns: how many subscriptions it ended in this process.
        :raises ConfigurationError: neither `channel` nor `key` was given (to end every
            subscription, close the broadcaster).
        :raises InvalidFieldError: the channel or key is invalid.
        :raises BroadcasterClosedError: the broadcaster was closed.
        :raises BackendUnavailableError: the order could not be sent to the other
            processes; this one's subscriptions were ended all the same.
        """
        order = self._order(channel, key)
        ended = self._revoke(channel, key)
        self._backend.publish(order.draft())
        return ended

    async def adisconnect(self, *, channel: str | None = None, key: str | None = None) -> int:
        """Do what [`disconnect`][ssecast.Broadcaster.disconnect] does, from a coroutine.

        A backend's I/O does not block the running loop.
        """
        order = self._order(channel, key)
        ended = self._revoke(channel, key)
        await self._backend.apublish(order.draft())
        return ended

    def _order(self, channel: str | None, key: str | None) -> _control.Disconnect:
        """Check a disconnect call's arguments; return the order for the other processes."""
        if channel is None and key is None:
            # Rather than end every stream of every process because an argument was None.
            raise ConfigurationError(
                "disconnect() needs a channel or a key (or both); "
                "to end every subscription, close the broadcaster"
            )
        return _control.Disconnect(
            self._origin,
            None if channel is None else check_channel(channel),
            None if key is None else check_field("key", key),
        )

    def _revoke(self, channel: str | None, key: str | None) -> int:
        """End this process's subscriptions of `channel` and with `key`; return how many."""
        woken: list[Waiter | None] = []
        with self._lock:
            if self._closed:
                raise BroadcasterClosedError("the broadcaster is closed")
            candidates = self._feeds() if key is None else self._keyed.get(key, set())
            matched = [feed for feed in candidates if channel is None or channel in feed.channels]
            for feed in matched:
                self._forget(feed)
                woken.append(feed.end(CloseReason.REVOKED))
            self._revoked += len(matched)
            for flight in self._in_flight:  # resumes waiting for the backend's history
                if (channel is None or channel in flight.request.channels) and (
                    key is None or flight.request.key == key
                ):
                    flight.revoked = True
        wake(woken)
        return len(matched)

    def _obey(self, event: Event) -> None:
        """Carry out an order another process sent through the backend.

        :raises BroadcasterClosedError: it was closed.
        """
        order = _control.parse(event)
        if order is not None and order.origin != self._origin:
            self._revoke(order.channel, order.key)

    # -- lifecycle -------------------------------------------------------------------

    def stats(self) -> Stats:
        """Return the counters, all read at the same instant, and the backend's state.

        It does no I/O: `backend_up` is what the backend's last call found.
        """
        backend_up = self._backend.available
        with self._lock:
            return Stats(
                self._subscriber_count,
                self._published,
                self._delivered,
                self._evicted,
                self._rejected,
                self._revoked,
                self._expired,
                self._refused,
                backend_up,
            )

    def check(self) -> None:
        """Return if the broadcaster can serve now; for health checks and readiness probes.

        It asks the backend's store (Redis: `PING`; PostgreSQL: `SELECT 1` on a new
        connection), which takes a few seconds at most; the memory backend has nothing to
        ask. From a coroutine, [`acheck`][ssecast.Broadcaster.acheck] leaves the loop free.

        :raises BroadcasterClosedError: the broadcaster was closed.
        :raises BackendUnavailableError: the backend's store could not be reached, or did
            not answer in time.
        """
        if self._closed:
            raise BroadcasterClosedError("the broadcaster is closed; create a new one to serve")
        self._backend.check()

    async def acheck(self) -> None:
        """Do what [`check`][ssecast.Broadcaster.check] does, in a worker thread."""
        await asyncio.to_thread(self.check)

    def close(self) -> None:
        """End every subscription (after its pending frames) and stop the backend.

        Later `publish` and `subscribe` calls raise
        [`BroadcasterClosedError`][ssecast.BroadcasterClosedError]. Safe to call twice.
        From a coroutine, [`aclose`][ssecast.Broadcaster.aclose] does not block the loop.
        """
        if self._shut_down():
            self._backend.close()

    async def aclose(self) -> None:
        """Do what [`close`][ssecast.Broadcaster.close] does, closing the backend off the loop."""
        if self._shut_down():
            await self._backend.aclose()

    def _shut_down(self) -> bool:
        """End every subscription; return whether this call closed the broadcaster."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            woken = self._end_all()
        wake(woken)
        return True

    def _in_child(self) -> None:
        """In a forked child: the parent's subscribers and listening are not this process's."""
        with self._lock:
            # Their readers are threads and loops of the parent: nothing to wake here.
            self._end_all()
            self._listening = False
            self._listen_attempt = None
            self._origin = secrets.token_hex(8)  # its orders are not the parent's
            # What the parent delivers from now on, this child does not see (and a sibling
            # delivers other events after the same ids): no resume from the parent's ring.
            self._history = History(self._history.size)
            self._in_flight.clear()  # the parent's threads' resumes

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_CONTROL_CHANNEL = _control.CHANNEL
_GAP_BODY = _wire.encode_body(_wire.event_prefix(GAP_EVENT_TYPE), b"{}")


class _Request(NamedTuple):
    """The checked arguments of one subscribe call."""

    channels: frozenset[str]
    capacity: int
    last_event_id: str | None
    key: str | None
    lifetime: float | None


class _Flight:
    """A subscription waiting for the backend's history, which a disconnect may match."""

    __slots__ = ("request", "revoked")

    def __init__(self, request: _Request) -> None:
        self.request = request
        self.revoked = False


class _Resume(NamedTuple):
    """A subscription the ring could not resume: what to ask the backend, and from when."""

    flight: _Flight
    mark: int
    """The ring's bookmark when the backend was asked; the ring gives what came after."""
    newest: str | None
    """The newest id delivered then: the backend replays up to it."""

    @property
    def request(self) -> _Request:
        return self.flight.request

    @property
    def last_event_id(self) -> str:
        return cast(str, self.request.last_event_id)

    @property
    def channels(self) -> frozenset[str]:
        return self.request.channels


class _Attempt:
    """A call of the backend's `listen` in progress, which other callers wait for."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def end(self, error: BaseException | None) -> None:
        """Let the waiting callers go on, with the attempt's failure if it failed."""
        self._error = error
        self._done.set()

    def join(self) -> None:
        """Wait for the attempt to end.

        :raises BackendUnavailableError: it failed.
        """
        self._done.wait()
        if self._error is not None:
            raise BackendUnavailableError(
                f"the backend could not start listening: {self._error}"
            ) from self._error


def _log_deferred_evictions(deferring: contextvars.Token[list[Feed] | None]) -> None:
    """Log the evictions deferred since `deferring` was set, and stop deferring them."""
    evicted = _evicted_here.get()
    _evicted_here.reset(deferring)
    if evicted:
        _log_evictions(evicted)


def _report_evictions(evicted: list[Feed]) -> None:
    """Log `evicted` now, or when the publish call that caused it is done with its locks."""
    deferred = _evicted_here.get()
    if deferred is None:
        _log_evictions(evicted)
    else:
        deferred.extend(evicted)


def _log_evictions(evicted: list[Feed]) -> None:
    for feed in evicted:
        logger.info(
            "evicted a subscriber of %s: more than %d frames pending",
            sorted(feed.channels),
            feed.capacity,
        )


def _gap(newest: str | None) -> bytes:
    """Return the gap event; its id is the newest, so a reconnect after it resumes from there.

    With nothing delivered yet there is no id to give, and the client keeps its own: a
    reconnect then gets another gap rather than silently starting live.
    """
    return _GAP_BODY if newest is None else _wire.stamp(newest, _GAP_BODY)


def _joined(prelude: list[bytes], events: list[Event]) -> list[bytes]:
    return [*prelude, *(event.frame for event in events)]


def _seconds(name: str, value: object) -> float:
    # threading waits refuse timeouts beyond TIMEOUT_MAX (about 292 years).
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= threading.TIMEOUT_MAX
    ):
        raise ConfigurationError(
            f"{name} must be a positive number of seconds (or None for none), got {value!r}"
        )
    return float(value)


def check_lifetime(value: object) -> float:
    """Return a stream lifetime if it is a positive number of seconds, else raise.

    :raises ConfigurationError: it is not.
    """
    return _seconds("lifetime", value)


def _at_least(minimum: int, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return value
