"""``ssecast.testing``: the WHATWG parser, and stream/astream against every adapter.

The adapters are the suite's own test apps (``tests/apps``), called in this process: bare
``EventStream``, Starlette, FastAPI, Litestar and Quart (ASGI), Flask and Django under
WSGI, and Django's ASGI handler. The Testing page's examples run in ``test_docs.py``.
Waits are bounded only to catch a hang: ``HANG`` is over ten times the slowest wait seen
with both cores busy.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import math
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given

from apps.asgi_support import TOKEN, authorize, channels_from_query
from ssecast import GAP_EVENT_TYPE, Broadcaster, ConfigurationError
from ssecast._wsgi import DISCONNECT_KEY
from ssecast.asgi import EventStream
from ssecast.testing import ReceivedEvent, astream, parse, stream
from strategies import event_stream_chunks

HANG = 30.0
"""Seconds after which a wait counts as a hang (an in-process event takes milliseconds)."""
SHORT = 0.2
"""A timeout a test waits out on purpose: no event, or no response start, is expected."""
GRACE = 1.0
"""A stream timeout a misbehaving app must outlast: ten times what an in-process start takes."""

M = "message"


# The parser: a corpus of the spec's rules, each as input chunks and expected events.

CORPUS: list[tuple[str, list[bytes], list[ReceivedEvent]]] = [
    ("LF ends lines", [b"data: a\n\n"], [ReceivedEvent("", M, "a")]),
    ("CRLF ends lines", [b"data: a\r\n\r\n"], [ReceivedEvent("", M, "a")]),
    (
        "a lone CR ends lines",
        [b"data: a\r\rdata: b\r\r"],
        [ReceivedEvent("", M, "a"), ReceivedEvent("", M, "b")],
    ),
    (
        "a CR ending a chunk and a LF starting the next are one line end",
        [b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"],
        [ReceivedEvent("", M, "a\nb")],
    ),
    (
        "a CR, then a LF after a chunk split inside a character",
        [b"data: \xc3\xa9\r", b"\n\r\n"],
        [ReceivedEvent("", M, "\u00e9")],
    ),
    ("a comment is skipped", [b": hello\ndata: a\n: more\n\n"], [ReceivedEvent("", M, "a")]),
    (
        "a block with no data is not dispatched",
        [b"event: x\n\n", b"data: a\n\n"],
        [ReceivedEvent("", M, "a")],
    ),
    (
        "a block with no data still sets the last event id",
        [b"id: 7\n\ndata: a\n\n"],
        [ReceivedEvent("7", M, "a")],
    ),
    (
        "the event type defaults to message, and does not carry over",
        [b"event: t\ndata: a\n\ndata: b\n\n"],
        [ReceivedEvent("", "t", "a"), ReceivedEvent("", M, "b")],
    ),
    ("an empty event type is message", [b"event:\ndata: a\n\n"], [ReceivedEvent("", M, "a")]),
    ("data lines join with LF", [b"data: a\ndata:\ndata: b\n\n"], [ReceivedEvent("", M, "a\n\nb")]),
    ("an empty data field dispatches empty data", [b"data\n\n"], [ReceivedEvent("", M, "")]),
    (
        "one leading space of a value is dropped, no more",
        [b"data:  a \n\n"],
        [ReceivedEvent("", M, " a ")],
    ),
    ("a value may hold colons", [b"data: a: b:c\n\n"], [ReceivedEvent("", M, "a: b:c")]),
    (
        "the id carries over to later events",
        [b"id: 1\ndata: a\n\ndata: b\n\n"],
        [ReceivedEvent("1", M, "a"), ReceivedEvent("1", M, "b")],
    ),
    (
        "an empty id field resets the id",
        [b"id: 1\ndata: a\n\nid\ndata: b\n\n"],
        [ReceivedEvent("1", M, "a"), ReceivedEvent("", M, "b")],
    ),
    (
        "an id holding NUL is ignored",
        [b"id: 1\n\nid: 2\x003\ndata: a\n\n"],
        [ReceivedEvent("1", M, "a")],
    ),
    (
        "retry sets the reconnection time, even on a block with no data",
        [b"retry: 1500\n\ndata: a\n\n"],
        [ReceivedEvent("", M, "a", 1500)],
    ),
    (
        "retry that is not ASCII digits is ignored",
        [b"retry: 10\n\nretry: 1x\nretry: \xd9\xa3\nretry: -1\nretry:\ndata: a\n\n"],
        [ReceivedEvent("", M, "a", 10)],
    ),
    ("an unknown field is ignored", [b"foo: bar\ndata: a\n\n"], [ReceivedEvent("", M, "a")]),
    ("field names are case-sensitive", [b"Data: a\n\ndata: b\n\n"], [ReceivedEvent("", M, "b")]),
    (
        "an event not ended by a blank line is discarded",
        [b"data: a\n\ndata: b\n"],
        [ReceivedEvent("", M, "a")],
    ),
    (
        "no line ends at U+2028 or NEL",
        [b"data: a\xe2\x80\xa8b\xc2\x85c\x0cd\n\n"],
        [ReceivedEvent("", M, "a\u2028b\x85c\x0cd")],
    ),
    ("one leading BOM is dropped", [b"\xef\xbb\xbfdata: a\n\n"], [ReceivedEvent("", M, "a")]),
    (
        "a second BOM is part of the field name",
        [b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n"],
        [ReceivedEvent("", M, "b")],
    ),
    (
        "a BOM later in the stream is kept",
        [b"data: \xef\xbb\xbfa\n\n"],
        [ReceivedEvent("", M, "\ufeffa")],
    ),
    (
        "a BOM split over chunks is dropped",
        [b"\xef", b"\xbb", b"\xbfdata: a\n\n"],
        [ReceivedEvent("", M, "a")],
    ),
    (
        "invalid UTF-8 is replaced",
        [b"data: a\xffb\xc3\n\n"],
        [ReceivedEvent("", M, "a\ufffdb\ufffd")],
    ),
    (
        "a chunk may split a UTF-8 character",
        [b"data: \xe2", b"\x82", b"\xac\n\n"],
        [ReceivedEvent("", M, "\u20ac")],
    ),
    ("a chunk may split a field name", [b"da", b"ta: a\n", b"\n"], [ReceivedEvent("", M, "a")]),
    ("empty chunks change nothing", [b"", b"data: a\n", b"", b"\n"], [ReceivedEvent("", M, "a")]),
    (
        "ssecast's own frame",
        [b': ok\n\nretry: 3000\n\nid: s-1\nevent: tick\ndata: {"n":1}\n\n'],
        [ReceivedEvent("s-1", "tick", '{"n":1}', 3000)],
    ),
]


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS]
)
def test_the_parser_follows_the_whatwg_algorithm(
    chunks: list[bytes], expected: list[ReceivedEvent]
) -> None:
    """Each rule of "interpreting an event stream", one case each, chunked as written."""
    assert parse(chunks) == expected


def test_parse_takes_bytes_or_any_iterable_of_chunks() -> None:
    """A whole body, a list, a generator, bytearrays or memoryviews give the same events."""
    body = b"data: a\r\n\r\n"
    expected = [ReceivedEvent("", M, "a")]
    assert parse(body) == expected
    assert parse(bytes([b]) for b in body) == expected
    assert parse([bytearray(body)]) == expected
    assert parse(bytearray(body)) == expected
    assert parse(memoryview(body)) == expected
    assert parse([memoryview(body[:5]), memoryview(body[5:])]) == expected


def test_a_long_line_in_many_chunks_is_read_in_linear_time() -> None:
    """A 4 MB data line cut into 4 KB chunks is read at once, not searched again at each chunk."""
    body = b"data: " + b"x" * (4 << 20) + b"\n\n"
    chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
    started = time.monotonic()
    assert parse(chunks) == [ReceivedEvent("", M, "x" * (4 << 20))]
    assert time.monotonic() - started < GRACE  # it took 20 s when every chunk rescanned the line


@given(event_stream_chunks())
def test_any_chunking_gives_the_events_of_one_chunk(case: tuple[bytes, list[bytes]]) -> None:
    """However a stream is cut into chunks (inside CRLF, inside a character), nothing changes."""
    whole, chunks = case
    assert parse(chunks) == parse(whole)


# The apps under test: each knows how to reach a channel, and what its refusal is.


@dataclass
class Target:
    """An application, its broadcaster, and how to ask it for a channel."""

    app: Any
    broadcaster: Broadcaster
    path: str  # formatted with the channel
    auth: dict[str, str] = field(default_factory=dict)  # headers that pass authorization
    refused_path: str = ""  # formatted with the channel: what authorization refuses
    refused_status: int = 403

    def url(self, channel: str) -> str:
        return self.path.format(channel=channel)


def _django_targets() -> Iterator[tuple[Target, Target]]:
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application
    from django.test.utils import override_settings

    from apps.django_project import views
    from ssecast.django import get_asgi_application

    if not settings.configured:
        settings.configure()
    with override_settings(
        ROOT_URLCONF="apps.django_project.urls", ALLOWED_HOSTS=["localhost"], DEBUG=False
    ):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        wsgi = Target(
            get_wsgi_application(),
            views.broadcaster,
            "/events?channel={channel}",
            auth,
            "/events?channel={channel}",
        )
        asgi = Target(
            get_asgi_application(views.broadcaster),
            views.broadcaster,
            "/events?channel={channel}",
            auth,
            "/events?channel={channel}",
        )
        yield wsgi, asgi


@pytest.fixture(scope="module")
def django_targets() -> Iterator[tuple[Target, Target]]:
    """Django's WSGI and ASGI handlers over the test project, with its settings in force."""
    yield from _django_targets()


def _target(name: str, django_targets: tuple[Target, Target] | tuple[None, None]) -> Target:
    if name == "eventstream":
        broadcaster = Broadcaster()
        app = EventStream(broadcaster, channels_from_query, authorize=authorize)
        return Target(app, broadcaster, "/?channel={channel}", refused_path="/?channel=private")
    if name in ("starlette", "fastapi", "litestar", "quart"):
        with warnings.catch_warnings():
            # Litestar 2 warns that EventStream's mount leaves copy_scope unset.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(f"apps.{name}_app")
        mounted = name in ("starlette", "fastapi")  # a Mount answers /events/ only
        path = "/events/?channel={channel}" if mounted else "/events?channel={channel}"
        refused = path.replace("{channel}", "private")
        return Target(module.app, module.broadcaster, path, refused_path=refused)
    if name == "flask":
        from apps import flask_app

        auth = {"Authorization": f"Bearer {TOKEN}"}
        path = "/events?channel={channel}"
        return Target(flask_app.app, flask_app.broadcaster, path, auth, path)
    wsgi, asgi = django_targets
    assert wsgi is not None
    assert asgi is not None
    return wsgi if name == "django-wsgi" else asgi


ASGI_APPS = ["eventstream", "starlette", "fastapi", "litestar", "quart", "django-asgi"]
WSGI_APPS = ["flask", "django-wsgi"]


@pytest.fixture(params=ASGI_APPS + WSGI_APPS)
def target(request: pytest.FixtureRequest) -> Target:
    """Each adapter's test app, in this process."""
    needs_django = request.param.startswith("django")
    django = request.getfixturevalue("django_targets") if needs_django else (None, None)
    return _target(request.param, django)


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """The threads started since ``before`` that are still running.

    Ours are joined before the block is left. Django's ASGI handler (asgiref) joins its
    per-request executor from a thread of its own, which may still be exiting then: it
    gets until ``HANG``.
    """
    deadline = time.monotonic() + HANG
    while True:
        new = [t for t in threading.enumerate() if t not in before]
        if not new or all(t.name == "ssecast-testing" for t in new) or time.monotonic() > deadline:
            return new
        time.sleep(0.01)


def channel() -> str:
    """A channel no other test uses."""
    return f"c-{uuid.uuid4().hex[:12]}"


def _settled(target: Target) -> None:
    # One request first, so that threads a framework keeps for good (Django's asgiref
    # executor) exist before the count is taken.
    with stream(target.app, target.url(channel()), headers=target.auth, timeout=HANG):
        pass


def test_stream_reads_what_is_published_and_close_unsubscribes(target: Target) -> None:
    """It opens with SSE headers, gets what is published, and close() unsubscribes at once."""
    _settled(target)
    threads = set(threading.enumerate())
    name = channel()
    with stream(target.app, target.url(name), headers=target.auth, timeout=HANG) as events:
        assert events.status == 200
        assert events.headers["content-type"].startswith("text/event-stream")
        assert events.headers["cache-control"] == "no-cache"
        first = target.broadcaster.publish("tick", {"n": 1}, channel=name)
        second = target.broadcaster.publish("tock", "two", channel=name, raw=True)
        assert events.events(2) == [
            ReceivedEvent(first.id, "tick", '{"n":1}'),
            ReceivedEvent(second.id, "tock", "two"),
        ]
        with pytest.raises(TimeoutError):
            events.next_event(timeout=SHORT)
        events.close()
        assert target.broadcaster.stats().subscribers == 0
    assert _new_threads(threads) == []


def test_leaving_the_block_disconnects(target: Target) -> None:
    """Leaving the block without close() disconnects too: the app unsubscribes."""
    _settled(target)
    threads = set(threading.enumerate())
    with stream(target.app, target.url(channel()), headers=target.auth, timeout=HANG):
        assert target.broadcaster.stats().subscribers == 1
    assert target.broadcaster.stats().subscribers == 0
    assert _new_threads(threads) == []


def test_last_event_id_resumes_after_that_event(target: Target) -> None:
    """A stream opened with last_event_id gets the events after it, then the live ones."""
    name = channel()
    seen = target.broadcaster.publish("tick", 1, channel=name)
    missed = target.broadcaster.publish("tick", 2, channel=name)
    url = target.url(name)
    with stream(target.app, url, headers=target.auth, last_event_id=seen.id, timeout=HANG) as s:
        assert s.next_event() == ReceivedEvent(missed.id, "tick", "2")
        live = target.broadcaster.publish("tick", 3, channel=name)
        assert s.next_event() == ReceivedEvent(live.id, "tick", "3")


def test_authorization_refusal_has_its_status_and_no_events(target: Target) -> None:
    """What the app's authorization refuses answers 403 and carries no event."""
    with stream(target.app, target.refused_path, timeout=HANG) as refused:
        assert refused.status == target.refused_status
        refused.read()
        with pytest.raises(EOFError):
            refused.next_event()
    assert target.broadcaster.stats().subscribers == 0


def test_a_starlette_streaming_response_is_disconnected_too() -> None:
    """An SSE endpoint written with Starlette's StreamingResponse sees close() at once."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def endless() -> AsyncIterator[str]:
        yield "data: hi\n\n"
        await asyncio.sleep(HANG * 10)

    async def events(request: Request) -> StreamingResponse:
        return StreamingResponse(endless(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/", events)])
    with stream(app, timeout=HANG) as s:
        assert s.next_event().data == "hi"
        started = time.monotonic()
        s.close()
        assert time.monotonic() - started < HANG


def test_an_infinite_timeout_waits_without_bound() -> None:
    """timeout=math.inf, for the stream or one read, waits as long as it takes, no OverflowError."""
    with Broadcaster() as broadcaster, stream(EventStream(broadcaster), timeout=math.inf) as s:
        timer = threading.Timer(SHORT, broadcaster.publish, ("tick", 1))
        timer.start()
        assert s.next_event().data == "1"
        timer = threading.Timer(SHORT, broadcaster.publish, ("tick", 2))
        timer.start()
        assert s.next_event(timeout=math.inf).data == "2"
        s.close()
        assert broadcaster.stats().subscribers == 0


def test_events_that_do_not_all_come_leave_the_ones_that_did_unread() -> None:
    """A failed events(n), timed out or ended, consumes nothing: next_event still returns them."""
    with Broadcaster() as broadcaster, stream(EventStream(broadcaster), timeout=HANG) as s:
        first = broadcaster.publish("tick", 1)
        second = broadcaster.publish("tick", 2)
        with pytest.raises(TimeoutError):
            s.events(3, timeout=SHORT)
        assert [e.id for e in s.events(2)] == [first.id, second.id]
    with stream(_wsgi_write, timeout=HANG) as s:
        with pytest.raises(EOFError):
            s.events(3)
        assert [e.data for e in s.events(2)] == ["written", "returned"]


async def test_aevents_that_do_not_all_come_leave_the_ones_that_did_unread() -> None:
    """The same under astream."""
    with Broadcaster() as broadcaster:
        async with astream(EventStream(broadcaster), timeout=HANG) as s:
            sent = broadcaster.publish("tick", 1)
            with pytest.raises(TimeoutError):
                await s.aevents(2, timeout=SHORT)
            assert (await s.anext_event()).id == sent.id


def test_an_unknown_resume_id_gets_a_gap_event() -> None:
    """Resuming from an id the history does not hold starts with ``ssecast.gap``."""
    with Broadcaster() as broadcaster:
        broadcaster.publish("tick", 1)
        with stream(EventStream(broadcaster), last_event_id="nope-1", timeout=HANG) as events:
            assert events.next_event().event == GAP_EVENT_TYPE


@pytest.fixture(params=[*ASGI_APPS, "flask"])
def async_target(request: pytest.FixtureRequest) -> Target:
    """The ASGI apps, and one WSGI app, for astream."""
    needs_django = request.param.startswith("django")
    django = request.getfixturevalue("django_targets") if needs_django else (None, None)
    return _target(request.param, django)


async def test_astream_reads_resumes_and_cleans_up(async_target: Target) -> None:
    """Astream does what stream does, awaiting: events, resume, timeout, disconnect."""
    target = async_target
    # A stream and a refusal first: threads the test's loop keeps for good (its default
    # executor, which Django and a first subscription use) exist before the count.
    async with astream(target.app, target.url(channel()), headers=target.auth, timeout=HANG):
        pass
    async with astream(target.app, target.refused_path, timeout=HANG):
        pass
    threads, tasks = set(threading.enumerate()), len(asyncio.all_tasks())
    name = channel()
    seen = target.broadcaster.publish("tick", 1, channel=name)
    missed = target.broadcaster.publish("tick", 2, channel=name)
    url = target.url(name)
    async with astream(
        target.app, url, headers=target.auth, last_event_id=seen.id, timeout=HANG
    ) as s:
        assert s.status == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        live = target.broadcaster.publish("tock", 3, channel=name)
        assert await s.aevents(2) == [
            ReceivedEvent(missed.id, "tick", "2"),
            ReceivedEvent(live.id, "tock", "3"),
        ]
        with pytest.raises(TimeoutError):
            await s.anext_event(timeout=SHORT)
        await s.aclose()
        assert target.broadcaster.stats().subscribers == 0
        await s.aclose()  # twice does nothing
    async with astream(target.app, target.refused_path, timeout=HANG) as refused:
        assert refused.status == 403
        await refused.aread()
    assert _new_threads(threads) == []
    assert len(asyncio.all_tasks()) == tasks


async def test_waits_that_time_out_leave_nothing_behind() -> None:
    """Polling a quiet stream with short timeouts keeps no waiter per poll."""
    with Broadcaster() as broadcaster:
        async with astream(EventStream(broadcaster), timeout=HANG) as s:
            for _ in range(100):
                with pytest.raises(TimeoutError):
                    await s.anext_event(timeout=0)
            assert s._inbox._wakers == []
            sent = broadcaster.publish("tick", 1)
            assert (await s.anext_event()).id == sent.id


async def test_a_reader_cancelled_as_an_event_comes_is_cancelled_cleanly() -> None:
    """A read cancelled in the very step that brings its event ends cancelled, the event kept."""
    go = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await go.wait()
        await send({"type": "http.response.body", "body": b"data: a\n\n", "more_body": True})
        await receive()
        await receive()

    async with astream(app, timeout=HANG) as s:
        reader = asyncio.create_task(s.anext_event())
        await asyncio.sleep(0)  # it waits
        go.set()  # the app sends next, before the reader learns it is cancelled
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert (await s.anext_event()).data == "a"


def test_a_task_the_app_left_running_is_cancelled_on_close() -> None:
    """A background task an ASGI app started and never awaited runs no more after the block."""
    cancelled = threading.Event()

    async def linger() -> None:
        try:
            await asyncio.sleep(HANG * 10)
        finally:
            cancelled.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        app.task = asyncio.get_running_loop().create_task(linger())  # type: ignore[attr-defined]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with stream(app, timeout=HANG) as s:
        assert s.status == 204
    assert cancelled.is_set()


def test_apps_are_told_asgi_or_wsgi(django_targets: tuple[Target, Target]) -> None:
    """Coroutine functions and objects with an async ``__call__`` are ASGI; the rest WSGI."""
    from ssecast._test_client import is_asgi

    for name in ASGI_APPS:
        assert is_asgi(_target(name, django_targets).app), name
    for name in WSGI_APPS:
        assert not is_asgi(_target(name, django_targets).app), name

    async def bare(scope: Any, receive: Any, send: Any) -> None: ...

    from apps import quart_app

    assert is_asgi(bare)
    assert is_asgi(quart_app.quart_app)  # the Quart object itself, not the test's dispatcher


# Applications that misbehave, or do what the adapters never do.


async def _asgi_text(scope: Any, receive: Any, send: Any) -> None:
    """Answer text with a repeated header and an extension message; then send once gone."""
    headers = [(b"content-type", b"text/plain"), (b"x-a", b"1"), (b"x-a", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.trailers", "headers": []})
    await send({"type": "http.response.body", "body": b"data: not an event\n\n", "more_body": True})
    await receive()
    await receive()
    await send({"type": "http.response.body", "body": b""})  # raises: the client has gone


def test_only_an_sse_response_is_parsed_and_headers_join() -> None:
    """A text/plain body has no events; repeated headers join; a send once gone is no error."""
    with stream(_asgi_text, timeout=HANG) as s:
        assert s.headers["x-a"] == "1, 2"
        with pytest.raises(TimeoutError):
            s.next_event(timeout=SHORT)


async def _asgi_echo_url(scope: Any, receive: Any, send: Any) -> None:
    """Answer, as an event, the path and query it was asked for."""
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    url = [scope["path"], scope["raw_path"].decode(), scope["query_string"].decode()]
    body = "data: " + " ".join(url) + "\n\n"
    await send({"type": "http.response.body", "body": body.encode(), "more_body": True})
    await receive()
    await receive()


def _wsgi_echo_url(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    path = environ["PATH_INFO"].encode("latin-1").decode()  # PEP 3333: bytes as latin-1
    return [f"data: {path} {environ['QUERY_STRING']}\n\n".encode()]


def _wsgi_echo_headers(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    keys = ("CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_X_A", "HTTP_CONTENT_TYPE")
    return [f"data: {[environ.get(key) for key in keys]}\n\n".encode()]


def test_a_wsgi_app_gets_content_type_and_length_where_pep_3333_puts_them() -> None:
    """Content-Type and Content-Length are CONTENT_TYPE and CONTENT_LENGTH, not HTTP_..."""
    headers = {"Content-Type": "application/json", "Content-Length": "0", "X-A": "1"}
    with stream(_wsgi_echo_headers, headers=headers, timeout=HANG) as s:
        assert s.next_event().data == "['application/json', '0', '1', None]"


async def _asgi_echo_last_event_id(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    sent = dict(scope["headers"]).get(b"last-event-id", b"none").decode()
    body = f"data: {sent}\n\n".encode()
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await receive()
    await receive()


@pytest.mark.parametrize(("last_event_id", "header"), [("7", "7"), ("", "none"), (None, "none")])
def test_last_event_id_is_sent_as_an_event_source_sends_it(
    last_event_id: str | None, header: str
) -> None:
    """Last-Event-ID carries the id given; the empty id, as an EventSource's, sends no header."""
    with stream(_asgi_echo_last_event_id, last_event_id=last_event_id, timeout=HANG) as s:
        assert s.next_event().data == header


def test_a_non_ascii_url_is_percent_encoded_as_a_browser_does() -> None:
    """A path and query with non-ASCII characters reach the app percent-encoded as UTF-8."""
    url = "/événements/a%20b?q=日本 x&r=%C3%A9"
    with stream(_asgi_echo_url, url, timeout=HANG) as s:
        assert s.next_event().data == (
            "/événements/a b /%C3%A9v%C3%A9nements/a%20b q=%E6%97%A5%E6%9C%AC%20x&r=%C3%A9"
        )
    with stream(_wsgi_echo_url, url, timeout=HANG) as s:
        assert s.next_event().data == "/événements/a b q=%E6%97%A5%E6%9C%AC%20x&r=%C3%A9"


async def _asgi_raises(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    await send({"type": "http.response.body", "body": b"data: a\n\n", "more_body": True})
    raise ValueError("boom")


async def _asgi_raises_at_once(scope: Any, receive: Any, send: Any) -> None:
    raise ValueError("boom")


async def _asgi_answers_nothing(scope: Any, receive: Any, send: Any) -> None:
    pass


async def _asgi_ignores_the_disconnect(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.sleep(HANG * 10)


async def _asgi_body_first(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.body", "body": b"data: early\n\n", "more_body": True})


async def _asgi_starts_twice(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.start", "status": 500, "headers": []})


@pytest.mark.parametrize("app", [_asgi_body_first, _asgi_starts_twice])
def test_an_asgi_message_out_of_order_fails_the_app_as_a_server_does(app: Any) -> None:
    """A body before the start, or a second start, raises in the app, and so in the test."""
    with (
        pytest.raises(RuntimeError, match=r"before http\.response\.start|twice"),
        stream(app, timeout=HANG) as s,
    ):
        s.next_event()


def test_an_app_error_is_raised_after_the_events_before_it() -> None:
    """The events sent before an app raised are read first; then its error is raised."""
    with stream(_asgi_raises, timeout=HANG) as s:
        assert s.next_event().data == "a"
        with pytest.raises(ValueError, match="boom"):
            s.next_event()


def test_an_app_error_unread_is_raised_on_leaving_the_block() -> None:
    """An error nobody read is raised when the block is left."""
    with pytest.raises(ValueError, match="boom"), stream(_asgi_raises, timeout=HANG) as s:
        assert s.next_event().data == "a"


@pytest.mark.parametrize(
    ("app", "error"),
    [(_asgi_raises_at_once, ValueError), (_asgi_answers_nothing, RuntimeError)],
)
def test_an_app_that_fails_before_answering_fails_the_block(app: Any, error: type) -> None:
    """An error before the response starts, or no response at all, is raised by stream()."""
    threads = set(threading.enumerate())
    with pytest.raises(error), stream(app, timeout=HANG):
        pass
    assert _new_threads(threads) == []


def test_an_app_that_ignores_the_disconnect_is_cancelled_and_reported() -> None:
    """An app still running a timeout after the disconnect is cancelled; close() says so."""
    threads = set(threading.enumerate())
    with (
        pytest.raises(TimeoutError, match="did not end"),
        stream(_asgi_ignores_the_disconnect, timeout=GRACE),
    ):
        pass
    assert _new_threads(threads) == []


async def test_astream_raises_a_timeout_when_no_response_starts() -> None:
    """An app that answers nothing within the timeout fails astream, and is cleaned up."""
    tasks = len(asyncio.all_tasks())

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(HANG * 10)

    with pytest.raises(TimeoutError, match="started no response"):
        async with astream(slow, timeout=SHORT):
            pass  # pragma: no cover - not reached
    assert len(asyncio.all_tasks()) == tasks


def test_lifespan_runs_only_when_asked_and_can_close_the_broadcaster() -> None:
    """The lifespan runs only with lifespan=True; its close_on_signal closes the broadcaster."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.routing import Route

    from ssecast.asgi import close_on_signal

    broadcaster = Broadcaster()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with close_on_signal(broadcaster):
            yield

    app = Starlette(routes=[Route("/events", EventStream(broadcaster))], lifespan=lifespan)
    with stream(app, "/events", timeout=HANG) as s:
        assert s.status == 200
    with stream(app, "/events", timeout=HANG, lifespan=True) as s:
        assert s.status == 200
    with stream(app, "/events", timeout=HANG) as s:
        assert s.next_event().event == "ssecast.unavailable"  # come back later
    with stream(app, "/events", headers={"Accept": "*/*"}, timeout=HANG) as s:
        assert s.status == 503
        assert b"the broadcaster is closed" in s.read()


async def _lifespan_fails(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


async def _lifespan_unsupported(scope: Any, receive: Any, send: Any) -> None:
    raise ValueError(f"no {scope['type']}")


async def _lifespan_silent(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.sleep(HANG * 10)


@pytest.mark.parametrize(
    ("app", "error", "message", "timeout"),
    [
        (_lifespan_fails, RuntimeError, "no database", HANG),
        (_lifespan_unsupported, ValueError, "no lifespan", HANG),
        (_lifespan_silent, RuntimeError, "did not complete", SHORT),
    ],
)
def test_a_lifespan_that_does_not_start_fails_the_block(
    app: Any, error: type, message: str, timeout: float
) -> None:
    """A failed, raising or silent lifespan startup is raised by stream(lifespan=True)."""
    with pytest.raises(error, match=message), stream(app, lifespan=True, timeout=timeout):
        pass  # pragma: no cover - not reached


async def _lifespan_mute_at_shutdown(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await asyncio.sleep(HANG * 10)  # never answers the shutdown
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    ("app", "step"), [(_lifespan_silent, "startup"), (_lifespan_mute_at_shutdown, "shutdown")]
)
async def test_astream_cancels_a_lifespan_that_does_not_answer(app: Any, step: str) -> None:
    """A lifespan silent at its startup or shutdown fails astream and runs no more after it."""
    tasks = len(asyncio.all_tasks())
    with pytest.raises(RuntimeError, match=f"{step} did not complete"):
        async with astream(app, lifespan=True, timeout=SHORT):
            pass  # pragma: no cover - not reached
    assert len(asyncio.all_tasks()) == tasks


def test_lifespan_is_for_asgi_apps_only() -> None:
    """lifespan=True with a WSGI app is a configuration error."""
    with pytest.raises(ConfigurationError), stream(_wsgi_list, lifespan=True):
        pass  # pragma: no cover - not reached


def _wsgi_list(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("403 Forbidden", [("Content-Type", "text/plain")])
    return [b"no\n"]


def _wsgi_ticks(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A plain generator: it learns of the disconnect only when it yields again."""
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    for n in range(1_000_000):
        yield b"data: %d\n\n" % n
        time.sleep(0.01)


def _wsgi_nothing(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    return []


def _wsgi_write(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    write = start_response("200 OK", [("Content-Type", "text/event-stream")])
    write(b"data: written\n\n")
    return [b"data: returned\n\n"]


def _wsgi_late(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """Starts too slowly, and registers a second closer after the client has left."""
    gone, told = threading.Event(), threading.Event()
    environ[DISCONNECT_KEY](gone.set)
    gone.wait(HANG)  # stream() timed out waiting for the start, and disconnected
    environ[DISCONNECT_KEY](told.set)  # called at once: the client is gone already
    assert told.is_set()
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    yield b""


_released = threading.Event()


def _wsgi_mute(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """Yields nothing until the test releases it: it cannot learn of the disconnect."""
    start_response("200 OK", [("Content-Type", "text/event-stream")])
    _released.wait(HANG)
    yield b""


class _ASGIInDisguise:
    """An ASGI app whose ``__call__`` is a plain function returning a coroutine."""

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return _asgi_answers_nothing(environ, start_response, None)


def test_a_wsgi_refusal_and_a_plain_body() -> None:
    """A WSGI list body is read whole; write() chunks count; its end is the end of events."""
    with stream(_wsgi_list, timeout=HANG) as s:
        assert (s.status, s.read()) == (403, b"no\n")
    with stream(_wsgi_write, timeout=HANG) as s:
        assert [e.data for e in s.events(2)] == ["written", "returned"]
        with pytest.raises(EOFError):
            s.next_event()


def test_a_plain_wsgi_generator_is_closed_at_its_next_chunk() -> None:
    """A WSGI app that is not ssecast's ends at its next yield after the disconnect."""
    threads = set(threading.enumerate())
    with stream(_wsgi_ticks, timeout=HANG) as s:
        assert s.next_event().data == "0"
    assert _new_threads(threads) == []


@pytest.mark.parametrize(
    ("app", "error", "timeout"),
    [
        (_wsgi_nothing, RuntimeError, HANG),
        (_ASGIInDisguise(), TypeError, HANG),
        (_wsgi_late, TimeoutError, SHORT),
    ],
)
def test_a_wsgi_app_that_fails_before_answering_fails_the_block(
    app: Any, error: type, timeout: float
) -> None:
    """No start_response, an awaitable, or a start slower than the timeout fail stream()."""
    threads = set(threading.enumerate())
    with pytest.raises(error), stream(app, timeout=timeout):
        pass  # pragma: no cover - not reached
    assert _new_threads(threads) == []


def test_a_wsgi_app_that_never_yields_again_is_reported_on_close() -> None:
    """A WSGI response blocked past the closing bound makes close() raise TimeoutError."""
    threads = set(threading.enumerate())
    with pytest.raises(TimeoutError, match="did not end"), stream(_wsgi_mute, timeout=GRACE / 2):
        pass
    _released.set()
    for thread in threading.enumerate():
        if thread.name == "ssecast-testing":
            thread.join(HANG)
    assert _new_threads(threads) == []


async def test_astream_over_a_stuck_wsgi_app_never_blocks_the_loop() -> None:
    """Closing a WSGI response that never yields again reports it, the loop running all along."""
    released = threading.Event()

    def mute(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        released.wait(HANG)
        yield b""

    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(SHORT / 4)

    ticker = asyncio.create_task(tick())
    with pytest.raises(TimeoutError, match="did not end"):
        async with astream(mute, timeout=GRACE):
            pass
    await asyncio.sleep(SHORT)  # a tick after the close, to time it
    ticker.cancel()
    released.set()
    # The stream's timeout is GRACE; a blocking join of the stuck thread stalled that long.
    assert max(b - a for a, b in itertools.pairwise(ticks)) < GRACE / 2


async def test_astream_over_wsgi_reports_its_errors() -> None:
    """Under astream a WSGI app's failure to start is raised, and its thread joined."""
    threads = set(threading.enumerate())
    with pytest.raises(RuntimeError):
        async with astream(_wsgi_nothing, timeout=HANG):
            pass  # pragma: no cover - not reached
    assert _new_threads(threads) == []
