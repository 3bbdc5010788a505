"""ssecast.flask over real servers: werkzeug's threaded dev server and gunicorn (gthread)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import flask
import pytest

from ssecast import UNAVAILABLE_EVENT_TYPE, Broadcaster, testing
from ssecast._http import OPENING
from ssecast.flask import stream

pytest.register_assert_rewrite("flask_django_checks")

import flask_django_checks as checks  # noqa: E402 - after its assertions are set to be rewritten
from servers import PYTHON, Server, free_port, running  # noqa: E402

pytestmark = pytest.mark.slow

SERVERS = ("werkzeug", "gunicorn")
# Streams held open by the shutdown checks: each holds a thread in either server.
STREAMS = {"werkzeug": 1000, "gunicorn": 1000}


@contextmanager
def flask_server(kind: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run the Flask test app under ``kind`` with ``SSECAST_TEST_*`` settings ``env``."""
    port = free_port()
    if kind == "werkzeug":
        argv = [PYTHON, "-m", "flask", "--app", "apps.flask_app", "run"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--with-threads"]
    else:
        argv = [PYTHON, "-m", "gunicorn", "-c", "apps/flask_gunicorn_conf.py"]
        argv += ["-b", f"127.0.0.1:{port}", "apps.flask_app:app"]
    with running(argv, port=port, env=env) as server:
        yield server


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The Flask test app with the main settings, one per server kind."""
    with flask_server(request.param, checks.MAIN_ENV) as running_server:
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
    """A client that goes away is gone from stats(): WSGI notices when a heartbeat fails."""
    elapsed = checks.check_disconnect(server)
    print(f"disconnect noticed after {elapsed:.2f} s (heartbeat {checks.HEARTBEAT} s)")


def test_forbidden_subscribes_nothing(server: Server) -> None:
    """The app's auth decorator answers 403 and no subscription is made."""
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
    with flask_server(kind, {"SSECAST_TEST_MAX_SUBSCRIBERS": "3"}) as server:
        checks.check_too_many(server, limit=3)


@pytest.mark.parametrize("kind", SERVERS)
def test_slow_reader_is_evicted(kind: str) -> None:
    """A client that stops reading is evicted and never holds up the others."""
    with flask_server(kind, {"SSECAST_TEST_QUEUE_SIZE": "8"}) as server:
        checks.check_slow_reader(server, queue_size=8)


@pytest.mark.parametrize("kind", SERVERS)
async def test_close_ends_every_stream(kind: str) -> None:
    """broadcaster.close() ends every open stream; newcomers then get 503."""
    env = {"SSECAST_TEST_HEARTBEAT": "0", "SSECAST_TEST_THREADS": str(STREAMS[kind] + 16)}
    with flask_server(kind, env) as server:
        elapsed = await checks.check_close_ends_streams(server, STREAMS[kind])
    print(f"{kind}: close() ended {STREAMS[kind]} streams in {elapsed:.2f} s")


@pytest.mark.parametrize("kind", SERVERS)
async def test_sigterm_stops_server_with_open_streams(kind: str) -> None:
    """SIGTERM stops the server with every stream open, and logs no traceback."""
    env = {"SSECAST_TEST_HEARTBEAT": "0", "SSECAST_TEST_THREADS": str(STREAMS[kind] + 16)}
    with flask_server(kind, env) as server:
        # werkzeug's dev server has no SIGTERM handler: the process dies and cuts every
        # stream; gunicorn closes the broadcaster first (flask_gunicorn_conf.py).
        elapsed = await checks.check_sigterm(server, STREAMS[kind], clean=kind == "gunicorn")
    print(f"{kind}: SIGTERM stopped the server with {STREAMS[kind]} streams in {elapsed:.2f} s")


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        ("flask", "pip install 'ssecast[flask]'"),
        ("werkzeug", "werkzeug"),
    ],
)
def test_import_without_flask_names_the_extra(hidden: str, expected: str) -> None:
    """Without Flask the import error names the extra; a missing dependency is re-raised."""
    # A finder that finds nothing by these names: what an environment without them does.
    code = (
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.partition('.')[0] == {hidden!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "try:\n"
        "    import ssecast.flask\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error.name, error, sep='|')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    kind, name, message = result.stdout.strip().split("|")
    assert kind == ("ImportError" if hidden == "flask" else "ModuleNotFoundError")
    assert expected in message
    if hidden != "flask":
        assert name == hidden  # re-raised unchanged
        assert "pip install" not in message


def test_response_closed_unread_unsubscribes(broadcaster: Broadcaster) -> None:
    """A response the server closes without reading it (HEAD, an error) unsubscribes."""
    app = flask.Flask(__name__)
    app.add_url_rule("/events", view_func=lambda: stream(broadcaster))
    response = app.test_client().get("/events", buffered=False)
    assert broadcaster.stats().subscribers == 1
    response.close()
    assert broadcaster.stats().subscribers == 0


def test_stream_reads_opening_then_events(broadcaster: Broadcaster) -> None:
    """The body starts with the opening bytes, then carries each event's frame."""
    app = flask.Flask(__name__)
    app.add_url_rule("/events", view_func=lambda: stream(broadcaster))
    response = app.test_client().get("/events", buffered=False)
    body = iter(response.response)
    assert next(body) == OPENING
    event = broadcaster.publish("tick", 1)
    assert next(body) == event.frame
    response.close()


def test_head_answers_the_headers_and_subscribes_nothing(broadcaster: Broadcaster) -> None:
    """HEAD gets the stream's headers at once; no subscription waits for a body never sent."""
    app = flask.Flask(__name__)
    app.add_url_rule("/events", view_func=lambda: stream(broadcaster), methods=["GET", "HEAD"])
    response = app.test_client().head("/events")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert broadcaster.stats().subscribers == 0


def test_a_closed_broadcaster_tells_an_eventsource_to_come_back_and_others_503() -> None:
    """After ``close()`` an EventSource gets a retry stream; other clients a 503 naming why."""
    broadcaster = Broadcaster()
    broadcaster.close()
    app = flask.Flask(__name__)
    app.add_url_rule("/events", view_func=lambda: stream(broadcaster))
    with testing.stream(app, "/events") as told:
        assert told.status == 200
        assert told.headers["content-type"] == "text/event-stream; charset=utf-8"
        event = told.next_event()
        assert (event.event, event.data) == (UNAVAILABLE_EVENT_TYPE, '{"reason":"closed"}')
        assert event.retry is not None
        assert 1000 <= event.retry <= 3000
        with pytest.raises(EOFError):
            told.next_event()
    with testing.stream(app, "/events", headers={"Accept": "*/*"}) as refused:
        assert refused.status == 503
        assert refused.headers["retry-after"] == "5"
        assert "the broadcaster is closed" in refused.read().decode()
    assert broadcaster.stats().refused == 2
