"""What the HTTP adapters share: the resume id and what a refusal tells the client."""

from __future__ import annotations

import pytest

from ssecast import BackendUnavailableError, BroadcasterClosedError, TooManySubscribersError
from ssecast._http import resume_id, unavailable_reason


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
