"""The Broadcaster: validate, encode once, fan out under the lock, evict the slow."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import NamedTuple, Self

from ssecast import _wire
from ssecast._backend import Backend, MemoryBackend
from ssecast._encoder import GAP_EVENT_TYPE, Encoder, Payload, Serializer
from ssecast._event import Draft, Event, check_field
from ssecast._exceptions import (
    BroadcasterClosedError,
    ConfigurationError,
    InvalidFieldError,
    PublishError,
    TooManySubscribersError,
)
from ssecast._history import History
from ssecast._subscription import Audience, CloseReason, Subscription, Waiter, wake

__all__ = ["DEFAULT_CHANNEL", "Broadcaster", "Stats"]

logger = logging.getLogger("ssecast")

DEFAULT_CHANNEL = "default"
"""The channel ``publish`` and ``subscribe`` use when given none."""
_DEFAULT_CHANNELS = frozenset((DEFAULT_CHANNEL,))


class Stats(NamedTuple):
    """Counters of one broadcaster, read at once by :meth:`Broadcaster.stats`."""

    subscribers: int
    """Subscriptions open now."""
    published: int
    """Events this process accepted in ``publish`` or ``apublish``."""
    delivered: int
    """Event frames handed to subscribers: one per event per subscriber."""
    evicted: int
    """Subscriptions ended because they fell more than ``queue_size`` behind."""
    rejected: int
    """Publishes refused by validation."""


class Broadcaster:
    """Broadcast events from any thread or event loop to many SSE subscribers.

    ``publish`` validates an event, serializes and encodes it once, and appends the
    same immutable bytes to every subscriber of its channel. A subscriber that falls
    more than ``queue_size`` frames behind is evicted rather than buffered without bound,
    so memory stays under ``max_subscribers x queue_size x max_payload_bytes``.

    :param event_types: the event types ``publish`` accepts; ``None`` accepts any valid one.
    :param max_payload_bytes: the largest serialized data, in UTF-8 bytes.
    :param queue_size: frames a subscriber may have pending; one more evicts it.
    :param history: recent events kept for ``Last-Event-ID`` resume; 0 keeps none.
    :param heartbeat: seconds of silence before a subscription yields a keep-alive
        comment; ``None`` sends none.
    :param retry: milliseconds a client should wait before reconnecting; when set,
        every stream begins with a ``retry:`` field.
    :param max_subscribers: the most subscriptions open at once; ``None`` is no limit.
    :param serializer: turns data into ``str`` or UTF-8 ``bytes``; the default is
        compact ``json.dumps`` that refuses NaN and infinities.
    :param backend: assigns ids, keeps history and carries events between processes;
        the default is a :class:`MemoryBackend`.
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
        self._encoder = Encoder(event_types, max_payload_bytes, serializer)
        self._backend: Backend = MemoryBackend() if backend is None else backend

        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._started = False
        self._listening = False
        self._closed = False
        # Guarded by self._lock:
        self._audiences: dict[str, Audience] = {}
        self._subscriber_count = 0
        self._published = 0
        self._delivered = 0
        self._evicted = 0
        self._rejected = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._subscriber_count} subscribers"
        return f"<Broadcaster {type(self._backend).__name__} {state}>"

    # -- publishing ------------------------------------------------------------------

    def publish(
        self, event_type: str, data: Payload, *, channel: str = DEFAULT_CHANNEL, raw: bool = False
    ) -> Event:
        """Send an event to every subscriber of ``channel``; return it, with its id.

        Never blocks on a subscriber; safe from any thread and inside an event loop
        (with the in-memory backend it does no I/O at all).

        :param event_type: the SSE event type, matched by ``addEventListener``.
        :param data: any value the serializer takes; with ``raw=True``, a ``str`` sent as is.
        :param channel: which subscribers get it.
        :param raw: send ``data`` (a ``str``, such as an HTML fragment) without serializing.
        :raises PublishError: the event is invalid (see its subclasses); nothing was sent.
        :raises BroadcasterClosedError: the broadcaster was closed.
        :raises BackendUnavailableError: the backend could not be reached; nothing was sent.
        """
        draft = self._draft(event_type, data, channel, raw)
        self._start()
        event = self._backend.publish(draft)
        with self._lock:
            self._published += 1
        return event

    async def apublish(
        self, event_type: str, data: Payload, *, channel: str = DEFAULT_CHANNEL, raw: bool = False
    ) -> Event:
        """Do what :meth:`publish` does; a backend's I/O does not block the running loop."""
        draft = self._draft(event_type, data, channel, raw)
        self._start()
        event = await self._backend.apublish(draft)
        with self._lock:
            self._published += 1
        return event

    def _draft(self, event_type: str, data: Payload, channel: str, raw: bool) -> Draft:
        """Validate and encode an event: everything ``publish`` does before the backend."""
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

    # -- delivery --------------------------------------------------------------------

    def _start(self) -> None:
        """Start the backend on first use, so a broadcaster made at import time forks safely."""
        if not self._started:
            with self._start_lock:
                # Checked under the lock _shut_down reads _started with: a backend
                # started after close() would never be closed.
                if self._closed:
                    raise BroadcasterClosedError("the broadcaster is closed")
                if not self._started:
                    self._backend.start(self._deliver)
                    self._started = True

    def _listen(self) -> None:
        """Have the backend deliver every process's events, before the first subscription."""
        if not self._listening:
            self._start()
            with self._start_lock:
                if self._closed:
                    raise BroadcasterClosedError("the broadcaster is closed")
                if not self._listening:
                    self._backend.listen()
                    self._listening = True

    async def _alisten(self) -> None:
        """Do what :meth:`_listen` does; a backend's connecting does not block the loop."""
        if not self._listening:
            await asyncio.to_thread(self._listen)

    def _deliver(self, event: Event) -> None:
        """Append one event's frame to its channel's subscribers; the backend calls this.

        :raises BroadcasterClosedError: it was closed (even while ``publish`` was running).
        """
        woken: list[Waiter | None] = []
        evicted: list[Subscription] = []
        with self._lock:
            if self._closed:
                raise BroadcasterClosedError("the broadcaster was closed; the event was not sent")
            self._history.append(event)
            audience = self._audiences.get(event.channel)
            if audience is None:
                return
            audience.deliver(event.frame, woken, evicted)
            self._delivered += len(audience.buffers) - len(evicted)
            for sub in evicted:
                self._forget(sub)
                sub._end(CloseReason.EVICTED)  # it had frames, so no reader is parked
            self._evicted += len(evicted)
        wake(woken)
        for sub in evicted:
            logger.info(
                "evicted a subscriber of %s: more than %d frames pending",
                sorted(sub.channels),
                sub._capacity,
            )

    # -- subscribing -----------------------------------------------------------------

    def subscribe(
        self, *channels: str, last_event_id: str | None = None, queue_size: int | None = None
    ) -> Subscription:
        """Open a subscription to ``channels`` (``"default"`` if none); it is live on return.

        With ``last_event_id``, the subscription first replays every event on its
        channels published after that id, then goes on live with no gap and no
        duplicate. When those events are no longer known, it begins with an
        ``ssecast.gap`` event instead, so the client can reload its state.

        Resuming from an id older than the ``history`` ring asks the backend, which may
        do I/O (Redis); from a coroutine, :meth:`asubscribe` does that off the loop.

        :param channels: the channels to receive.
        :param last_event_id: the id of the last event the client saw (the
            ``Last-Event-ID`` header); ``None`` or ``""`` starts live.
        :param queue_size: this subscriber's limit of pending frames, instead of the
            broadcaster's.
        :raises InvalidFieldError: a channel name is invalid.
        :raises TooManySubscribersError: ``max_subscribers`` are open already.
        :raises BroadcasterClosedError: the broadcaster was closed.
        :raises BackendUnavailableError: resuming needed the backend, which is unreachable.
        """
        begun = self._begin(channels, last_event_id, queue_size)
        if isinstance(begun, Subscription):
            return begun
        older = self._backend.replay(begun.last_event_id, begun.newest, begun.channels)
        return self._finish(begun, older)

    async def asubscribe(
        self, *channels: str, last_event_id: str | None = None, queue_size: int | None = None
    ) -> Subscription:
        """Do what :meth:`subscribe` does; a backend's I/O does not block the running loop."""
        await self._alisten()
        begun = self._begin(channels, last_event_id, queue_size)
        if isinstance(begun, Subscription):
            return begun
        if type(self._backend) is MemoryBackend:
            # It keeps no history of its own: no call, and no thread, for a stale id.
            # (A subclass may keep some, so it is asked like any other backend.)
            return self._finish(begun, None)
        older = await asyncio.to_thread(
            self._backend.replay, begun.last_event_id, begun.newest, begun.channels
        )
        return self._finish(begun, older)

    def _begin(
        self, channels: tuple[str, ...], last_event_id: str | None, queue_size: int | None
    ) -> Subscription | _Resume:
        """Subscribe from the ring of recent events, or say what to ask the backend."""
        names = frozenset(check_field("channel", name) for name in channels) or _DEFAULT_CHANNELS
        capacity = (
            self._queue_size if queue_size is None else _at_least(1, "queue_size", queue_size)
        )
        if last_event_id is not None and not isinstance(last_event_id, str):
            raise InvalidFieldError("last event id", last_event_id, "expected a str or None")
        self._listen()
        with self._lock:
            self._check_room()
            if not last_event_id:
                return self._register(names, capacity, self._prelude.copy())
            replayed = self._history.after(last_event_id, names)
            if replayed is not None:
                return self._register(names, capacity, _joined(self._prelude, replayed))
            return _Resume(
                names, capacity, last_event_id, self._history.mark, self._history.last_id
            )

    def _finish(self, resume: _Resume, older: list[Event] | None) -> Subscription:
        """Subscribe with what the backend replayed; the ring fills in what came since."""
        with self._lock:
            self._check_room()
            if older is None:
                # Unknown to the backend, or newer than what this process has delivered so
                # far (another process saw it first): the ring may hold it by now.
                replayed = self._history.after(resume.last_event_id, resume.channels)
            else:
                recent = self._history.since(resume.mark, resume.channels)
                replayed = None if recent is None else older + recent
            if replayed is None:
                head = [*self._prelude, _gap(self._history.last_id)]
            else:
                head = _joined(self._prelude, replayed)
            return self._register(resume.channels, resume.capacity, head)

    def _check_room(self) -> None:
        # Precondition: self._lock is held.
        if self._closed:
            raise BroadcasterClosedError("the broadcaster is closed; it takes no subscribers")
        if self._max_subscribers is not None and self._subscriber_count >= self._max_subscribers:
            raise TooManySubscribersError(self._max_subscribers)

    def _register(self, channels: frozenset[str], capacity: int, head: list[bytes]) -> Subscription:
        # Precondition: self._lock is held.
        sub = Subscription(
            channels=channels,
            capacity=capacity,
            heartbeat=self._heartbeat,
            head=head,
            lock=self._lock,
            release=self._release,
        )
        sub._audiences = tuple(self._audience(name) for name in channels)
        for audience in sub._audiences:
            audience.add(sub)
        self._subscriber_count += 1
        return sub

    def _release(self, sub: Subscription) -> None:
        """Close ``sub`` for its consumer: forget it and wake its reader."""
        with self._lock:
            self._forget(sub)
            waiter = sub._end(CloseReason.UNSUBSCRIBED)
        wake((waiter,))

    def _forget(self, sub: Subscription) -> None:
        """Remove ``sub`` from every channel it is registered on, if it still is."""
        # Precondition: self._lock is held.
        if sub.close_reason is not None:
            return  # already forgotten when it ended
        for name in sub.channels:
            audience = self._audiences[name]
            del audience.buffers[sub]
            if not audience.buffers:
                del self._audiences[name]
        self._subscriber_count -= 1

    def _audience(self, channel: str) -> Audience:
        # Precondition: self._lock is held.
        audience = self._audiences.get(channel)
        if audience is None:
            audience = self._audiences[channel] = Audience()
        return audience

    # -- lifecycle -------------------------------------------------------------------

    def stats(self) -> Stats:
        """Return the counters, all read at the same instant."""
        with self._lock:
            return Stats(
                self._subscriber_count,
                self._published,
                self._delivered,
                self._evicted,
                self._rejected,
            )

    def close(self) -> None:
        """End every subscription (after its pending frames) and stop the backend.

        Later ``publish`` and ``subscribe`` calls raise :class:`BroadcasterClosedError`.
        Safe to call twice.
        """
        if self._shut_down():
            self._backend.close()

    async def aclose(self) -> None:
        """Do what :meth:`close` does, closing the backend without blocking the loop."""
        if self._shut_down():
            await self._backend.aclose()

    def _shut_down(self) -> bool:
        """End every subscription; return whether a started backend needs closing."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            subs = {sub for audience in self._audiences.values() for sub in audience.buffers}
            self._audiences.clear()
            self._subscriber_count = 0
            woken = [sub._end(CloseReason.SHUTDOWN) for sub in subs]
        wake(woken)
        with self._start_lock:
            return self._started

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


_GAP_BODY = _wire.encode_body(_wire.event_prefix(GAP_EVENT_TYPE), b"{}")


class _Resume(NamedTuple):
    """A subscription the ring could not resume: what to ask the backend, and from when."""

    channels: frozenset[str]
    capacity: int
    last_event_id: str
    mark: int
    """The ring's bookmark when the backend was asked; the ring gives what came after."""
    newest: str | None
    """The newest id delivered then: the backend replays up to it."""


def _gap(newest: str | None) -> bytes:
    """Return the gap event; its id is the newest, so a reconnect after it resumes from there.

    With nothing delivered yet there is no id to give, and the client keeps its own: a
    reconnect then gets another gap rather than silently starting live.
    """
    return _GAP_BODY if newest is None else _wire.stamp(newest, _GAP_BODY)


def _joined(prelude: list[bytes], events: list[Event]) -> list[bytes]:
    return [*prelude, *(event.frame for event in events)]


def _seconds(name: str, value: float) -> float:
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


def _at_least(minimum: int, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return value
