"""What the HTTP adapters share: the resume id and what a refusal tells the client."""

from __future__ import annotations

import pytest

from ssecast import (
    UNAVAILABLE_EVENT_TYPE,
    BackendUnavailableError,
    BroadcasterClosedError,
    SsecastError,
    TooManySubscribersError,
)
from ssecast._http import refusal, resume_id, unavailable_reason
from ssecast.testing import parse


@pytest.mark.parametrize(
    ("header", "query", "expected"),
    [
        ("abc-3", "lastEventId=other", "abc-3"),  # the header wins
        (None, "lastEventId=abc-3", "abc-3"),
        ("", "channel=x&lastEventId=abc%2D3", "abc-3"),
        (None, "lastEventId=", None),
        (None, "", None),
    ],
)
def test_the_resume_id_comes_from_the_header_else_the_query(
    header: str | None, query: str, expected: str | None
) -> None:
    """EventSource sends Last-Event-ID on reconnects; a first request can use the query."""
    assert resume_id(header, query) == expected


def test_a_503_never_tells_the_client_where_the_backend_is() -> None:
    """The backend's error names its host; the client gets a fixed sentence instead."""
    reason = unavailable_reason(BackendUnavailableError("redis://10.0.0.5:6379 refused"))
    assert "10.0.0.5" not in reason
    assert "retry later" in reason
    assert unavailable_reason(TooManySubscribersError(5)) == str(TooManySubscribersError(5))
    for closed in (BroadcasterClosedError("closed"), BroadcasterClosedError("was closed")):
        assert unavailable_reason(closed).startswith("the broadcaster is closed")


@pytest.mark.parametrize(
    ("error", "reason", "least", "most"),
    [
        (BroadcasterClosedError("closed"), "closed", 1000, 3000),
        (BackendUnavailableError("redis://10.0.0.5:6379 down"), "backend_unavailable", 2000, 6000),
        (TooManySubscribersError(5), "too_many_subscribers", 2000, 6000),
    ],
)
def test_an_eventsource_refused_for_a_while_is_told_when_to_come_back(
    error: SsecastError, reason: str, least: int, most: int
) -> None:
    """A 200 stream: a retry delay drawn from the reason's window, and one event naming it."""
    delays = set()
    for _ in range(50):
        refused = refusal(error, "text/event-stream")
        assert refused.status == 200
        (event,) = parse(refused.stream)
        assert (event.event, event.data, event.id) == (
            UNAVAILABLE_EVENT_TYPE,
            f'{{"reason":"{reason}"}}',
            "",  # no id: the client resumes from its own last event
        )
        assert event.retry is not None
        assert least <= event.retry <= most
        delays.add(event.retry)
        assert b"10.0.0.5" not in refused.stream
    assert len(delays) > 1  # jitter: 50 draws from thousands of values are not all equal


@pytest.mark.parametrize(
    "accept",
    [None, "", "*/*", "text/html,application/xhtml+xml,*/*;q=0.8", "text/event-streams"],
)
def test_other_clients_refused_for_a_while_get_a_503(accept: str | None) -> None:
    """curl, health checks and fetch() keep the status code, which they understand."""
    refused = refusal(TooManySubscribersError(5), accept)
    assert (refused.status, refused.stream) == (503, b"")
    assert refused.reason == str(TooManySubscribersError(5))


@pytest.mark.parametrize(
    "accept", ["text/event-stream", "TEXT/Event-Stream", "application/json, text/event-stream;q=1"]
)
def test_any_accept_naming_an_event_stream_is_an_eventsource(accept: str) -> None:
    """The media type is found in a list, with parameters, in any case."""
    assert refusal(BroadcasterClosedError("closed"), accept).status == 200
