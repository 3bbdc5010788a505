"""Authorization: a client refused for a channel never receives a byte of its events.

The reliability app (``tests/apps/reliability_app.py``) runs on uvicorn: channels whose
name starts with ``secret`` need ``token=letmein``. Every secret event carries a marker
that the tests look for in the raw bytes each client receives, not in parsed events, so
that even a malformed or partial leak is caught.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.reliability_client import Chunked, exchange, open_stream, post_json
from servers import PYTHON, Server, free_port, running
from sse_parser import parse

pytestmark = pytest.mark.slow

TOKEN = "letmein"
MARKER = "SECRET-PAYLOAD"
CHANNELS = ("public", "other", "secret-a", "secret-b")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Server, dict[str, list[str]]]]:
    """The app, with 10 events on each channel (secret ones carry the marker) in its history.

    Yields the server and each channel's event ids, oldest first.
    """
    port = free_port()
    argv = [
        *(PYTHON, "-m", "uvicorn", "apps.reliability_app:app", "--host", "127.0.0.1"),
        *("--port", str(port), "--timeout-graceful-shutdown", "1", "--no-access-log"),
    ]
    with running(argv, port=port) as srv:
        ids: dict[str, list[str]] = {name: [] for name in CHANNELS}
        for n, channel in zip(range(40), itertools.cycle(CHANNELS), strict=False):
            ids[channel].append(publish(srv, channel, n))
        yield srv, ids
    assert "Traceback" not in srv.log()


def payload(channel: str, n: int | str) -> str:
    """The data of event ``n``: secret channels carry the marker."""
    marker = MARKER if channel.startswith("secret") else "open"
    return f"{marker}:{channel}:{n}"


def publish(srv: Server, channel: str, n: int | str) -> str:
    """Publish one event through the control route; return its id."""
    query = urlencode({"channel": channel, "data": payload(channel, n)})
    event_id: str = post_json(srv.port, f"/publish?{query}")
    return event_id


def get(
    srv: Server, query: list[tuple[str, str]], last_event_id: str | None = None
) -> dict[str, Any]:
    """GET the stream with raw sockets; return status, headers and the first body chunk."""
    target = "/events?" + urlencode(query)
    headers = "Host: 127.0.0.1\r\n"
    if last_event_id is not None:
        headers += f"Last-Event-ID: {last_event_id}\r\n"
    return exchange(srv.port, f"GET {target} HTTP/1.1\r\n{headers}\r\n".encode())


def subscribers(srv: Server) -> int:
    """How many subscriptions the server has open."""
    reply = exchange(srv.port, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    import json

    count: int = json.loads(reply["body"])["subscribers"]
    return count


@pytest.mark.parametrize(
    "query",
    [
        [("channel", "secret-a")],
        [("channel", "public"), ("channel", "secret-a")],
        [("channel", "secret-a"), ("channel", "public")],
        [("channel", "public"), ("channel", "secret-a"), ("token", "wrong")],
        [("channel", "public"), ("channel", "secret-a"), ("token", "")],
        [("channel", "secret-a"), ("token", TOKEN.upper())],
    ],
)
def test_refused_client_gets_403_and_no_byte_of_the_channel(
    server: tuple[Server, dict[str, list[str]]], query: list[tuple[str, str]]
) -> None:
    """A client refused for one of its channels gets a 403 with no event byte, alone or mixed."""
    srv, _ = server
    before = subscribers(srv)
    reply = get(srv, query)
    assert reply["status"] == 403
    assert reply["body"] == b"forbidden\n"
    assert subscribers(srv) == before


@pytest.mark.parametrize("via", ["header", "query"])
def test_resume_into_a_refused_channel_is_refused(
    server: tuple[Server, dict[str, list[str]]], via: str
) -> None:
    """Resuming with an id from the refused channel's history is a 403 with no event byte."""
    srv, ids = server
    resume = ids["secret-a"][2]
    query = [("channel", "public"), ("channel", "secret-a")]
    if via == "query":
        reply = get(srv, [*query, ("lastEventId", resume)])
    else:
        reply = get(srv, query, last_event_id=resume)
    assert reply["status"] == 403
    assert MARKER.encode() not in reply["body"]


@pytest.mark.parametrize("via", ["header", "query"])
def test_resume_from_a_secret_id_on_an_allowed_channel_replays_only_that_channel(
    server: tuple[Server, dict[str, list[str]]], via: str
) -> None:
    """A Last-Event-ID pointing into a secret channel's history replays only allowed events."""
    srv, ids = server
    resume = ids["secret-a"][2]
    if via == "query":
        reply = get(srv, [("channel", "public"), ("lastEventId", resume)])
    else:
        reply = get(srv, [("channel", "public")], last_event_id=resume)
    assert reply["status"] == 200
    assert MARKER.encode() not in reply["body"]
    events = parse(reply["body"]).events
    # Events 0, 4, 8, ... are public; the resume id is event 10 (secret-a's third).
    assert [event.data for event in events] == [payload("public", n) for n in range(12, 40, 4)]


def test_the_token_opens_the_secret_channel(server: tuple[Server, dict[str, list[str]]]) -> None:
    """With the token, the same resume does replay the secret events (the marker is seen)."""
    srv, ids = server
    query = [("channel", "public"), ("channel", "secret-a"), ("token", TOKEN)]
    reply = get(srv, query, last_event_id=ids["public"][0])
    assert reply["status"] == 200
    datas = [event.data for event in parse(reply["body"]).events]
    wanted = [payload(CHANNELS[n % 4], n) for n in range(1, 40) if n % 4 in (0, 2)]
    assert datas == wanted


async def test_live_events_of_a_refused_channel_never_reach_an_allowed_client(
    server: tuple[Server, dict[str, list[str]]],
) -> None:
    """A client of open channels reads live traffic with 400 secret events mixed in: none leak."""
    srv, _ = server
    # Channels of its own, so that the replays the other tests check stay as they were.
    path = "/events?channel=open-live&channel=other-live"
    reader, writer, response = await open_stream(srv.port, path)
    assert response.status == 200
    chunked, body = Chunked(), b""
    try:
        for n in range(500):
            channel = "secret-live" if n % 5 else "open-live"
            await asyncio.to_thread(publish, srv, channel, f"live-{n}")
        await asyncio.to_thread(publish, srv, "other-live", "end")
        async with asyncio.timeout(10):
            while payload("other-live", "end").encode() not in body:
                body += chunked.feed(await reader.read(65536))
    finally:
        writer.close()
    assert MARKER.encode() not in body
    datas = [event.data for event in parse(body).events]
    wanted = [payload("open-live", f"live-{n}") for n in range(0, 500, 5)]
    assert datas == [*wanted, payload("other-live", "end")]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    channels=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=4),
    token=st.sampled_from([None, TOKEN, "nope", quote(TOKEN) + " "]),
    resume=st.none() | st.tuples(st.sampled_from(CHANNELS), st.integers(0, 9)),
    via_query=st.booleans(),
)
def test_any_mix_of_channels_token_and_resume_leaks_nothing(
    server: tuple[Server, dict[str, list[str]]],
    channels: list[str],
    token: str | None,
    resume: tuple[str, int] | None,
    via_query: bool,
) -> None:
    """For any channel list, token and resume point: 403 exactly when refused, else only its own."""
    srv, ids = server
    query = [("channel", name) for name in channels]
    if token is not None:
        query.append(("token", token))
    resume_id = None if resume is None else ids[resume[0]][resume[1]]
    if resume_id is not None and via_query:
        query.append(("lastEventId", resume_id))
        resume_id = None
    reply = get(srv, query, last_event_id=resume_id)
    refused = any(name.startswith("secret") for name in channels) and token != TOKEN
    if refused:
        assert reply["status"] == 403
        assert reply["body"] == b"forbidden\n"
        return
    assert reply["status"] == 200
    for event in parse(reply["body"]).events:
        if event.type == "tick":
            assert event.data.split(":")[1] in channels
    if not any(name.startswith("secret") for name in channels):
        assert MARKER.encode() not in reply["body"]
