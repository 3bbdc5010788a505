"""ssecast.django over real servers: gunicorn (WSGI, gthread) and uvicorn (ASGI)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse, StreamingHttpResponse
from django.test import AsyncRequestFactory, RequestFactory

from ssecast import UNAVAILABLE_EVENT_TYPE, Broadcaster
from ssecast._http import OPENING
from ssecast.django import EventStreamView, stream
from ssecast.testing import parse

pytest.register_assert_rewrite("flask_django_checks")

import flask_django_checks as checks  # noqa: E402 - after its assertions are set to be rewritten
from servers import PYTHON, Server, free_port, running  # noqa: E402

pytestmark = pytest.mark.slow

SERVERS = ("gunicorn", "uvicorn")
# Streams held open by the shutdown checks. Under gunicorn each holds a busy thread; under
# uvicorn the stream is read on the loop (Django keeps one idle thread per ASGI request).
STREAMS = {"gunicorn": 1000, "uvicorn": 1000}
SETTINGS = {"DJANGO_SETTINGS_MODULE": "apps.django_project.settings"}


@contextmanager
def django_server(kind: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run the Django test project under ``kind`` with ``SSECAST_TEST_*`` settings ``env``."""
    port = free_port()
    if kind == "gunicorn":
        argv = [PYTHON, "-m", "gunicorn", "-c", "apps/django_project/gunicorn_conf.py"]
        argv += ["-b", f"127.0.0.1:{port}", "apps.django_project.wsgi:application"]
    else:
        # The docs' setup: the app closes the broadcaster on SIGTERM (asgi.py, at lifespan
        # startup); the graceful timeout only bounds shutdown should a response still hang.
        argv = [PYTHON, "-m", "uvicorn", "apps.django_project.asgi:application"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"]
        argv += ["--timeout-graceful-shutdown", "5", "--no-access-log"]
    with running(argv, port=port, env={**SETTINGS, **(env or {})}) as server:
        yield server


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The Django test project with the main settings, one per server kind."""
    with django_server(request.param, checks.MAIN_ENV) as running_server:
        yield running_server


def test_headers_and_opening(server: Server) -> None:
    """The response has the SSE headers and sends its opening bytes at once."""
    checks.check_headers_and_opening(server)


def test_events_in_order(server: Server) -> None:
    """Events arrive in publish order with their type, id and data."""
    checks.check_events_in_order(server)


def test_resume_by_header(server: Server) -> None:
    """A Last-Event-ID header replays exactly the missed events."""
    checks.check_resume(server, by_query=False)


def test_resume_by_query(server: Server) -> None:
    """A lastEventId query parameter replays exactly the missed events."""
    checks.check_resume(server, by_query=True)


def test_gap(server: Server) -> None:
    """An id the server no longer knows begins the stream with the gap event."""
    checks.check_gap(server)


def test_disconnect_noticed(server: Server) -> None:
    """A gone client leaves stats(): under WSGI when a heartbeat fails, under ASGI with none."""
    if "uvicorn" in str(server.process.args):
        # With the heartbeat off nothing is written to a quiet stream, so only ASGI's
        # disconnect message can tell the view that its client left.
        env = {**checks.MAIN_ENV, "SSECAST_TEST_HEARTBEAT": "0"}
        with django_server("uvicorn", env) as quiet:
            elapsed = checks.check_disconnect(quiet)
        print(f"disconnect noticed after {elapsed:.2f} s (no heartbeat)")
    else:
        elapsed = checks.check_disconnect(server)
        print(f"disconnect noticed after {elapsed:.2f} s (heartbeat {checks.HEARTBEAT} s)")


def test_event_stream_view(server: Server) -> None:
    """EventStreamView.as_view(broadcaster=..., channels=[...]) streams its channels."""
    checks.check_events_in_order(server, path="/prices", name="prices")


def test_event_stream_view_takes_a_key_and_a_lifetime(server: Server) -> None:
    """EventStreamView.as_view(key=..., lifetime=...) ends its streams, which resume."""
    checks.check_lifetime(server, path="/prices", name="prices")


def test_event_stream_view_refuses_head(server: Server) -> None:
    """EventStreamView answers HEAD with 405 rather than subscribing a client that reads nothing."""
    assert httpx.head(f"{server.url}/prices").status_code == 405


def test_forbidden_subscribes_nothing(server: Server) -> None:
    """The view's own authorization check answers 403 and no subscription is made."""
    checks.check_forbidden(server)


def test_one_stream_too_many_for_a_key_is_429(server: Server) -> None:
    """Beyond max_subscribers_per_key a user's next stream is a 429; other users go on."""
    checks.check_per_key_limit(server)


def test_streams_end_at_their_lifetime_and_resume(server: Server) -> None:
    """A stream with a lifetime ends by itself; the client resumes and misses nothing."""
    checks.check_lifetime(server)


def test_invalid_channel_is_400(server: Server) -> None:
    """An invalid channel name is answered 400, never 500."""
    checks.check_invalid_channel(server)


async def test_200_clients_receive_every_event(server: Server) -> None:
    """200 concurrent clients each receive every event, in order."""
    elapsed = await checks.check_many_clients(server, clients=200)
    print(f"200 clients received 10 events each within {elapsed:.2f} s")


@pytest.mark.parametrize("kind", SERVERS)
def test_too_many_subscribers_is_503(kind: str) -> None:
    """Beyond max_subscribers a client gets 503 with Retry-After; the others go on."""
    with django_server(kind, {"SSECAST_TEST_MAX_SUBSCRIBERS": "3"}) as server:
        checks.check_too_many(server, limit=3)


@pytest.mark.parametrize("kind", SERVERS)
def test_slow_reader_is_evicted(kind: str) -> None:
    """A client that stops reading is evicted and never holds up the others."""
    with django_server(kind, {"SSECAST_TEST_QUEUE_SIZE": "8"}) as server:
        checks.check_slow_reader(server, queue_size=8)


@pytest.mark.parametrize("kind", SERVERS)
async def test_close_ends_every_stream(kind: str) -> None:
    """broadcaster.close() ends every open stream; newcomers then get 503."""
    env = {"SSECAST_TEST_HEARTBEAT": "0", "SSECAST_TEST_THREADS": str(STREAMS[kind] + 16)}
    with django_server(kind, env) as server:
        elapsed = await checks.check_close_ends_streams(server, STREAMS[kind])
    print(f"{kind}: close() ended {STREAMS[kind]} streams in {elapsed:.2f} s")


@pytest.mark.parametrize("kind", SERVERS)
async def test_sigterm_stops_server_with_open_streams(kind: str) -> None:
    """SIGTERM stops the server with every stream open, and logs no traceback."""
    env = {"SSECAST_TEST_HEARTBEAT": "0", "SSECAST_TEST_THREADS": str(STREAMS[kind] + 16)}
    with django_server(kind, env) as server:
        elapsed = await checks.check_sigterm(server, STREAMS[kind])
    print(f"{kind}: SIGTERM stopped the server with {STREAMS[kind]} streams in {elapsed:.2f} s")


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        ("django", "pip install 'ssecast[django]'"),
        ("asgiref", "asgiref"),
    ],
)
def test_import_without_django_names_the_extra(hidden: str, expected: str) -> None:
    """Without Django the import error names the extra; a missing dependency is re-raised."""
    # A finder that finds nothing by these names: what an environment without them does.
    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.partition('.')[0] == {hidden!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "try:\n"
        "    import ssecast.django\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error.name, error, sep='|')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    kind, name, message = result.stdout.strip().split("|")
    assert kind == ("ImportError" if hidden == "django" else "ModuleNotFoundError")
    assert expected in message
    if hidden != "django":
        assert name == hidden  # re-raised unchanged
        assert "pip install" not in message


@pytest.fixture(scope="module")
def factories() -> tuple[RequestFactory, AsyncRequestFactory]:
    """Request factories for calling stream() in this process, with default settings."""
    if not settings.configured:
        settings.configure()
    return RequestFactory(), AsyncRequestFactory()


def test_wsgi_request_gets_a_sync_stream(
    broadcaster: Broadcaster, factories: tuple[RequestFactory, AsyncRequestFactory]
) -> None:
    """Under WSGI the body is a plain iterator: the opening bytes, then each event."""
    response = stream(factories[0].get("/events"), broadcaster)
    assert isinstance(response, StreamingHttpResponse)
    assert not response.is_async
    body = response.streaming_content
    assert isinstance(body, Iterator)
    assert next(body) == OPENING
    event = broadcaster.publish("tick", 1)
    assert next(body) == event.frame
    response.close()
    assert broadcaster.stats().subscribers == 0


async def test_asgi_request_gets_an_async_stream(
    broadcaster: Broadcaster, factories: tuple[RequestFactory, AsyncRequestFactory]
) -> None:
    """Under ASGI the body is an async iterator read on the loop: opening, then events."""
    response = stream(factories[1].get("/events"), broadcaster)
    assert isinstance(response, StreamingHttpResponse)
    assert response.is_async
    body = response.streaming_content
    assert isinstance(body, AsyncIterator)
    assert await anext(body) == OPENING
    event = broadcaster.publish("tick", 1)
    async with asyncio.timeout(5):
        assert await anext(body) == event.frame
    response.close()
    assert broadcaster.stats().subscribers == 0


@pytest.mark.parametrize("factory", [0, 1], ids=["wsgi", "asgi"])
def test_response_closed_unread_unsubscribes(
    broadcaster: Broadcaster, factories: tuple[RequestFactory, AsyncRequestFactory], factory: int
) -> None:
    """A response closed without being read (an error in a middleware) unsubscribes."""
    response = stream(factories[factory].get("/events"), broadcaster)
    assert broadcaster.stats().subscribers == 1
    response.close()
    assert broadcaster.stats().subscribers == 0


@pytest.mark.parametrize(
    "options", [{}, {"channels": "prices"}], ids=["no broadcaster", "channels a str"]
)
def test_event_stream_view_misconfigured(
    broadcaster: Broadcaster,
    factories: tuple[RequestFactory, AsyncRequestFactory],
    options: dict[str, object],
) -> None:
    """EventStreamView without a broadcaster, or with one channel name as a str, says so."""
    if options:
        options = {"broadcaster": broadcaster, **options}
    view = EventStreamView.as_view(**options)
    with pytest.raises(ImproperlyConfigured, match="EventStreamView"):
        view(factories[0].get("/prices"))
    assert broadcaster.stats().subscribers == 0


@pytest.mark.parametrize("factory", [0, 1], ids=["wsgi", "asgi"])
def test_head_answers_the_headers_and_subscribes_nothing(
    broadcaster: Broadcaster, factories: tuple[RequestFactory, AsyncRequestFactory], factory: int
) -> None:
    """HEAD gets the stream's headers at once; no subscription waits for a body never sent."""
    response = stream(factories[factory].head("/events"), broadcaster)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream; charset=utf-8"
    assert broadcaster.stats().subscribers == 0


def test_a_closed_broadcaster_is_a_503_that_says_so(
    factories: tuple[RequestFactory, AsyncRequestFactory],
) -> None:
    """After ``close()`` a request is answered 503 with ``Retry-After`` and a body naming why."""
    broadcaster = Broadcaster()
    broadcaster.close()
    refused = stream(factories[0].get("/events"), broadcaster)
    assert isinstance(refused, HttpResponse)
    assert refused.status_code == 503
    assert refused["Retry-After"]
    assert refused.content.decode().startswith("the broadcaster is closed")
    assert broadcaster.stats().refused == 1


def test_a_closed_broadcaster_tells_an_eventsource_to_come_back(
    factories: tuple[RequestFactory, AsyncRequestFactory],
) -> None:
    """An EventSource's request gets a 200 stream: a retry delay and ssecast.unavailable."""
    broadcaster = Broadcaster()
    broadcaster.close()
    request = factories[0].get("/events", headers={"Accept": "text/event-stream"})
    told = stream(request, broadcaster)
    assert isinstance(told, HttpResponse)
    assert told.status_code == 200
    assert told["Content-Type"] == "text/event-stream; charset=utf-8"
    (event,) = parse(told.content)
    assert (event.event, event.data) == (UNAVAILABLE_EVENT_TYPE, '{"reason":"closed"}')
    assert event.retry is not None
    assert 1000 <= event.retry <= 3000


def test_ssecast_js_is_a_static_file_of_the_ssecast_app() -> None:
    """With ``"ssecast"`` in INSTALLED_APPS, Django's static files finder finds ssecast.js."""
    script = (
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure(\n"
        "    INSTALLED_APPS=['django.contrib.staticfiles', 'ssecast'], STATIC_URL='/static/'\n"
        ")\n"
        "django.setup()\n"
        "from django.contrib.staticfiles import finders\n"
        "print(finders.find('ssecast.js'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip().endswith("ssecast/static/ssecast.js")
